"""Evaluation job: encode a split's queries, search the index, compute metrics, write reports.

Queries go :data:`EVAL_BLOCK` at a time (:class:`BlockScorer`, :func:`run_sink`): a block is
encoded, searched and scored, and its pooled top-k written to ``run.parquet``, so the eval
task never holds the whole run with its scores (the answer metrics hold its (query,
passage) pairs at the end: :mod:`qgscale.eval.answer_metrics`).

Plain path (no Ray): :func:`evaluate_split` takes an encoder and a loaded index. The job
(:func:`run_eval`, ``python -m qgscale.eval``) runs :func:`evaluate_uris` as one Ray task (on
a GPU when the cluster has one) that searches through one Ray actor per index shard (the task
holds a block's top-k, never the index or a corpus-sized map) and writes ``run.parquet``, so
``ray job submit ... -- python -m qgscale.eval --config X`` does the heavy work on the
cluster; the driver writes ``metrics.json``, ``metrics.md`` and ``pairs.png`` (bar chart per
language pair) to ``eval.out`` (local or ``s3://``).

Searches: the pooled corpus once (per-query-language view), and, when the corpus holds several
languages and ``eval.pairs`` is on, each corpus language alone through a FAISS ``IDSelector``
(exact restriction, no over-fetching): the per (query lang, corpus lang) pairs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.errors import ConfigError, DataError, MissingInputError
from qgscale.eval import metrics as M
from qgscale.eval.metrics import report_names

log = logging.getLogger("qgscale")

# ---------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """A split's queries, qrels and answers, and the corpus the index was built from."""

    qids: list[str]
    texts: list[str]
    query_lang: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_uri: str
    answers: dict[str, list[str]] | None = None
    source: dict[str, str] = field(default_factory=dict)


def _split_uri(data_uri: str, split: str, kind: str) -> str | None:
    """``data/<split>/<kind>`` (xquad-style splits) or else ``data/<kind>`` (one split)."""
    for uri in (storage.join(data_uri, split, kind), storage.join(data_uri, kind)):
        if storage.exists(uri):
            return uri
    return None


def _queries_uri(data_uri: str, split: str) -> str:
    uri = _split_uri(data_uri, split, "queries")
    if uri is None:
        raise MissingInputError(f"{data_uri}: no queries for split {split!r} (looked for "
                                f"{split}/queries and queries; see eval.splits, eval.data)")
    return uri


def _require(table: pa.Table, names: list[str], uri: str) -> None:
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise DataError(f"{uri}: missing field(s) {missing}")


def load_split(data_uri: str, split: str, corpus_uri: str | None = None,
               answers: bool = True) -> EvalData:
    """Read ``split`` of a prepared dataset (``qgscale data prepare`` layout)."""
    q_uri = _queries_uri(data_uri, split)
    queries = storage.read_parquet(q_uri)
    _require(queries, ["qid", "lang", "text"], q_uri)
    qids = queries.column("qid").to_pylist()
    if len(set(qids)) != len(qids):
        first: dict[str, int] = {}
        for i, q in enumerate(qids):
            if q in first:
                raise DataError(f"{q_uri}: rows {first[q]} and {i}: duplicate qid {q!r}")
            first[q] = i
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    r_uri = _split_uri(data_uri, split, "qrels")
    if r_uri is not None:
        for f in storage.parquet_files(r_uri):
            table = storage.read_parquet(f)
            _require(table, ["qid", "pid", "rel"], f)
            for i, (q, p, r) in enumerate(zip(*(table.column(c).to_pylist()
                                                for c in ("qid", "pid", "rel")), strict=True)):
                if not q or not p or r is None:
                    field = "qid" if not q else "pid" if not p else "rel"
                    raise DataError(f"{f}: row {i} (qid={q}): empty field {field!r}")
                qrels[q][p] = int(r)
    ans = None
    a_uri = _split_uri(data_uri, split, "answers") if answers else None
    if a_uri is not None:
        from qgscale.retrieval.answers import read_answers

        ans = read_answers(a_uri)
    if r_uri is None and ans is None:
        raise MissingInputError(f"{data_uri}: split {split!r} has neither qrels nor answers "
                                f"(looked for {split}/qrels, qrels, {split}/answers, answers)")
    corpus_uri = corpus_uri or _split_uri(data_uri, split, "corpus")
    if corpus_uri is None:
        raise MissingInputError(f"{data_uri}: no corpus for split {split!r} (looked for "
                                f"{split}/corpus and corpus)")
    return EvalData(qids, queries.column("text").to_pylist(),
                    dict(zip(qids, queries.column("lang").to_pylist(), strict=True)),
                    dict(qrels), corpus_uri, ans,
                    {"queries": q_uri, "qrels": r_uri or "", "answers": a_uri or "",
                     "corpus": corpus_uri})


def corpus_langs(corpus_uri: str) -> list[str]:
    """Distinct passage languages (reads only the ``lang`` column, shard by shard:
    :func:`qgscale.runtime.map_shards`, on Ray tasks for remote or many files, with the
    driver's window from the eval task too: its search actors have not started or wait)."""
    from qgscale.runtime import map_shards

    files = storage.list_files(corpus_uri, ".parquet") or [corpus_uri]
    return sorted({x for langs in map_shards(_shard_langs, files, cluster_window=True)
                   for x in langs})


def _shard_langs(uri: str) -> list[str]:
    return pc.unique(storage.read_parquet(uri, ["lang"]).column("lang")).to_pylist()


def passage_langs(corpus_uri: str, pids: set[str] | None) -> dict[str, str]:
    """``pid -> lang`` for ``pids`` (all when None), shard by shard
    (:func:`qgscale.data.corpus.scan`, with the driver's window as :func:`corpus_langs`)."""
    from qgscale.data.corpus import scan

    lang: dict[str, str] = {}
    for t in scan(corpus_uri, pids, ("pid", "lang"), cluster_window=True):
        lang.update(zip(t.column("pid").to_pylist(), t.column("lang").to_pylist(), strict=True))
    return lang


# ---------------------------------------------------------------------------- search
def restricted_search(loaded: Any, x: np.ndarray, k: int, ids: np.ndarray | None,
                      nprobe: int | None = None, ef_search: int | None = None):
    """Top-``k`` ``(pids, scores)`` of a ``qgscale.index.search.LoadedIndex`` among ``ids``
    only (all when None). Index shards are searched one by one and merged (IndexShards does
    not pass search parameters down); with the index's refine store, the merged top
    ``k * k_factor`` is re-ranked with the exact vectors, as its IndexRefine does."""
    import faiss

    from qgscale.index.search import _to_results, rerank, search_params

    if ids is None:
        return loaded.search(x, k)
    x = np.ascontiguousarray(x, dtype=np.float32)
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
    k_base = int(k * loaded.k_factor) if loaded.store is not None else k
    heap = faiss.ResultHeap(len(x), k_base, keep_max=loaded.metric == "ip")
    for part in loaded.parts or [loaded.index]:
        dist, found = part.search(x, k_base,
                                  params=search_params(part, sel, nprobe, ef_search))
        heap.add_result(dist, found)
    heap.finalize()
    dist, found = heap.D, heap.I
    if loaded.store is not None:
        dist, found = rerank(loaded.store, x, found, k, loaded.metric)
    return _to_results(dist, found, loaded.pids, loaded.metric)


def to_run(qids: list[str], pids: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """Search results as a run ``{qid: {pid: score}}`` (missing hits dropped)."""
    return {q: {p: float(s) for p, s in zip(row_p, row_s, strict=True) if p is not None}
            for q, row_p, row_s in zip(qids, pids, scores, strict=True)}


# ---------------------------------------------------------------------------- evaluation
def run_table(run: dict[str, dict[str, float]]) -> pa.Table:
    """A run as rows ``{qid, pids, scores}`` (:data:`qgscale.data.schema.CANDIDATES`), each
    list in rank order (:func:`qgscale.eval.metrics.ranking`)."""
    from qgscale.data.schema import CANDIDATES

    ranked = {q: M.ranking(s) for q, s in run.items()}
    return pa.Table.from_pydict(
        {"qid": list(ranked), "pids": list(ranked.values()),
         "scores": [[run[q][p] for p in ps] for q, ps in ranked.items()]}, schema=CANDIDATES)


@contextlib.contextmanager
def run_sink(uri: str | None) -> Iterator[tuple[Callable[[dict], None], dict | None]]:
    """Where a split's pooled run goes, block by block: ``(add, run)``. With ``uri``, a
    parquet file of :func:`run_table` rows written as it comes
    (:func:`qgscale.storage.parquet_sink`) and ``run`` None; else ``add`` fills the dict
    ``run`` (small splits, tests)."""
    if not uri:
        run: dict[str, dict] = {}
        yield run.update, run
        return
    from qgscale.data.schema import CANDIDATES

    with storage.parquet_sink(uri, CANDIDATES) as write:
        yield (lambda r: write(run_table(r))), None


EVAL_BLOCK = 16_384  # queries encoded, searched and scored at a time


class BlockScorer:
    """Every metric of a split's runs, added a block of queries at a time
    (:class:`qgscale.eval.metrics.LanguageMetrics`, holding running sums): the ranking
    metrics at once, with the languages of the split's qrels passages read from the corpus
    once (:func:`passage_langs`; not when the caller holds every passage's); the answer
    metrics at :meth:`result`, from one pass over the corpus for all blocks
    (:class:`qgscale.eval.answer_metrics.AnswerRuns`, which keeps the blocks' rankings in a
    scratch folder meanwhile). It holds neither the runs nor passage texts.

    With answers (``data.answers``): R@2kt / R@5kt when ``answer_recall``, and acc@k for
    each of ``ks`` with the answer match ``answer_accuracy`` unless it is ``"off"``."""

    def __init__(self, data: EvalData, ks: list[int] | None = None, *,
                 answer_recall: bool = True, answer_accuracy: str = "dpr") -> None:
        from qgscale.eval.answer_metrics import AnswerRuns

        self.data = data
        ks = ks or [1, 5, 10, 20, 100]
        recall = answer_recall and data.answers is not None
        accuracy = answer_accuracy != "off" and data.answers is not None
        match = answer_accuracy if accuracy else "dpr"
        self.acc = M.LanguageMetrics(M.metric_names(ks), recall,
                                     accuracy_ks=ks if accuracy else (), match=match)
        self.answer_runs = (AnswerRuns(data.answers, data.query_lang, data.corpus_uri,
                                       recall, ks if accuracy else (), match)
                            if recall or accuracy else None)
        self.plang: dict[str, str] | None = None  # the qrels passages' languages
        self.n_gone = 0  # positives not in the corpus, and the first of them
        self.first_gone: tuple[str, str] | None = None

    def add(self, qids: list[str], pooled: dict, pair_runs: dict,
            plang_all: dict | None = None) -> None:
        """Score the queries ``qids``: ``pooled`` (their run over the whole corpus) and
        ``pair_runs`` (``{(query lang, corpus lang): run}``); ``plang_all``: every indexed
        passage's language, when the caller holds it (a local index)."""
        d = self.data
        qrels = {q: d.qrels[q] for q in qids if q in d.qrels}
        if plang_all is not None:
            self.plang = plang_all
        elif self.plang is None:  # every qrels passage of the split, in one corpus pass
            needed = {p for rels in d.qrels.values() for p in rels}
            self.plang = passage_langs(d.corpus_uri, needed) if needed else {}
        gone = [(q, p) for q, rels in qrels.items() for p, r in rels.items()
                if r > 0 and p not in self.plang]
        self.n_gone += len(gone)
        self.first_gone = self.first_gone or (gone[0] if gone else None)
        self.acc.add(pair_runs, qrels, {q: d.query_lang[q] for q in qids}, self.plang, pooled,
                     ranking_only=True)
        if self.answer_runs is not None:
            self.answer_runs.add(qids, pooled, pair_runs)

    def result(self) -> dict:
        runs, self.answer_runs = self.answer_runs, None  # scored once
        if runs is not None:
            try:
                for pair_rows, pooled_rows in runs.rows():
                    self.acc.add_rows(pair_rows, pooled_rows)
            finally:
                runs.close()
        if self.n_gone:  # a positive no index can return: every view counts it as a miss
            log.warning("%s: %d positive qrels pair(s) of the evaluated queries name a passage "
                        "not in the corpus %s (e.g. qid=%s, pid=%s): they count as misses in "
                        "the pooled view and in every language pair's",
                        self.data.source.get("qrels") or "qrels", self.n_gone,
                        self.data.corpus_uri, *self.first_gone)
        return self.acc.result()


def evaluate_split(encoder: Any, loaded: Any, data: EvalData, *, top_k: int = 100,
                   ks: list[int] | None = None, batch_size: int = 128, pairs: bool = True,
                   nprobe: int | None = None, ef_search: int | None = None,
                   device: str = "cpu", precision: str = "fp32", run_uri: str | None = None,
                   block: int = EVAL_BLOCK, answer_recall: bool = True,
                   answer_accuracy: str = "dpr", langs: list[str] | None = None) -> dict:
    """Encode ``data``'s queries with ``encoder``, search ``loaded``, compute every metric.

    ``loaded``: an index held here (``qgscale.index.search.LoadedIndex``), or a
    ``ShardedSearcher`` (one Ray actor per index shard, built with the corpus: this process
    then holds neither the index, its id map nor a pid -> language map of the corpus).
    Queries go ``block`` at a time (:class:`BlockScorer`): this process holds one block's
    vectors and top-k, and running sums of the metrics (and, for the answer metrics, the
    split's (query, passage) pairs at the end), never the whole run. The pooled
    top-k goes to ``run_uri`` (parquet, :func:`run_table` rows) when given, else into the
    result as ``run`` (``{qid: {pid: score}}``). ``answer_recall``, ``answer_accuracy``: the
    answer metrics of a split with answers (:class:`BlockScorer`). ``langs``: the corpus's
    languages (:func:`corpus_langs`) when the caller has read them.

    Returns ``{pairs, query_langs, query_langs_macro, macro, n_queries, corpus_langs, top_k,
    timings}`` (and ``run``).
    """
    from qgscale.index.encode import encode_texts, nonfinite_rows, token_lengths
    from qgscale.index.search import ShardedSearcher

    if not data.qids:
        raise DataError(f"{data.source.get('queries') or 'eval data'}: no queries")
    timings: dict[str, float] = defaultdict(float)
    langs = corpus_langs(data.corpus_uri) if langs is None else langs
    plang_all, lang_ids = None, {}
    if pairs and len(langs) > 1 and not isinstance(loaded, ShardedSearcher):
        plang_all = passage_langs(data.corpus_uri, None)  # a local index
        index_langs = np.array([plang_all.get(p) for p in loaded.pids], dtype=object)
        lang_ids = {cl: np.flatnonzero(index_langs == cl).astype(np.int64) for cl in langs}
    scorer = BlockScorer(data, ks, answer_recall=answer_recall,
                         answer_accuracy=answer_accuracy)
    with run_sink(run_uri) as (add_run, run):
        for start in range(0, len(data.qids), block):
            qids = data.qids[start:start + block]
            texts = data.texts[start:start + block]
            t0 = time.time()
            lengths = token_lengths(getattr(encoder, "tokenizer", None), texts)
            qvec = encode_texts(encoder.encode_queries, texts, batch_size, lengths, device,
                                precision)
            bad = nonfinite_rows(qvec)
            if bad.size:  # FAISS would return nothing for it: an empty run scored as a miss
                raise DataError(f"qid={qids[int(bad[0])]}: non-finite query embedding "
                                f"({bad.size} of {len(qvec)} queries in a block; "
                                f"precision={precision})")
            timings["encode_s"] += time.time() - t0
            t0 = time.time()
            pooled = to_run(qids, *loaded.search(qvec, top_k))
            pair_runs: dict[tuple[str, str], dict] = {}
            by_qlang: dict[str, list[int]] = defaultdict(list)
            for i, q in enumerate(qids):
                by_qlang[data.query_lang[q]].append(i)
            for ql, rows in sorted(by_qlang.items()):
                sub = [qids[i] for i in rows]
                for cl in langs:
                    if len(langs) == 1:  # the pooled corpus is the pair's corpus
                        pair_runs[(ql, cl)] = pooled
                    elif pairs and isinstance(loaded, ShardedSearcher):  # actors restrict
                        pair_runs[(ql, cl)] = to_run(sub, *loaded.search(qvec[rows], top_k,
                                                                         lang=cl))
                    elif pairs:
                        pair_runs[(ql, cl)] = to_run(sub, *restricted_search(
                            loaded, qvec[rows], top_k, lang_ids[cl], nprobe, ef_search))
            timings["search_s"] += time.time() - t0
            t0 = time.time()
            scorer.add(qids, pooled, pair_runs, plang_all)
            add_run(pooled)
            timings["metrics_s"] += time.time() - t0
    out = scorer.result()
    out.update(n_queries=len(data.qids), corpus_langs=langs, top_k=top_k,
               timings=dict(timings))
    if run is not None:
        out["run"] = run
    return out


def evaluate_baseline(cfg: Any, run_uri: str, data_uri: str, split: str, corpus_uri: str,
                      out_uri: str, block: int = EVAL_BLOCK) -> dict:
    """The BM25 baseline of ``split``: the metrics of its run (``bm25-eval``'s
    ``run.parquet``, :data:`qgscale.retrieval.sharded.RUN`) on the split's queries, with the
    same metric code as the students, read and scored ``block`` queries at a time; reports
    (and the split's queries' run) in ``out_uri/<split>/``."""
    from qgscale.retrieval.sharded import read_run

    ec = cfg.eval
    t0 = time.time()
    data = load_split(data_uri, split, corpus_uri,
                      answers_wanted(ec.answer_recall, ec.answer_accuracy))
    wanted, seen = set(data.qids), set()
    langs = corpus_langs(data.corpus_uri)
    scorer = BlockScorer(data, ec.k, answer_recall=ec.answer_recall,
                         answer_accuracy=ec.answer_accuracy)
    with run_sink(storage.join(out_uri, split, "run.parquet")) as (add_run, _):
        for pooled, per_lang in read_run(run_uri, block):
            qids = [q for q in pooled if q in wanted]
            if not qids:  # none of the split's queries: nothing to read or score
                continue
            seen.update(qids)
            pair_runs: dict[tuple[str, str], dict] = {}
            for ql in sorted({data.query_lang[q] for q in qids}):
                if len(langs) == 1:
                    pair_runs[(ql, langs[0])] = pooled
                else:
                    pair_runs.update({(ql, cl): run for cl, run in per_lang.items()})
            scorer.add(qids, pooled, pair_runs)
            add_run({q: pooled[q] for q in qids})
        missing = [q for q in data.qids if q not in seen]
        if missing:  # raised inside: no run file is written
            raise DataError(f"{run_uri}: no BM25 result for query {missing[0]!r} of "
                            f"{data_uri} split {split!r} ({len(missing)} missing): rerun "
                            "stage bm25-eval")
    out = scorer.result()
    out.update(n_queries=len(data.qids), corpus_langs=langs, top_k=ec.top_k,
               timings={"total_s": time.time() - t0}, model="bm25", bm25_run=run_uri,
               split=split, sources=data.source)
    write_reports(out, storage.join(out_uri, split), report_names(ec.k), ec.chart_metric)
    return out


def answers_wanted(answer_recall: bool, answer_accuracy: str) -> bool:
    """Whether the eval settings use a split's answers (R@kt or acc@k)."""
    return answer_recall or answer_accuracy != "off"


def evaluate_uris(model_uri: str, index_uri: str, data_uri: str, split: str, *,
                  corpus_uri: str | None = None, device: str | None = None,
                  search_cpus: float = 1.0, search_gpus: float = 0.0,
                  gpus_explicit: bool = False, refine: str = "none", k_factor: float = 4.0,
                  answer_recall: bool = True, answer_accuracy: str = "dpr", **kw: Any) -> dict:
    """Load the student and the split from storage and evaluate, searching the index with
    one Ray actor per index shard of ``search_cpus`` CPUs and ``search_gpus`` GPUs (FAISS on
    them; ``gpus_explicit``: asked for in the config, so a faiss without GPU support is an
    error, :func:`qgscale.index.gpu.use_gpu`), which re-rank with their shard's
    exact vectors under ``refine`` (a Ray task body: it holds one block of queries' top-k,
    not the index nor its vectors, and writes the run to ``run_uri`` when given; ``device``:
    torch's default when not given)."""
    from qgscale.index.encode import load_dual_encoder
    from qgscale.index.search import ShardedSearcher
    from qgscale.models.precision import default_device

    manifest = storage.read_manifest(index_uri) or {}
    if corpus_uri is None and manifest.get("embeddings"):
        corpus_uri = (storage.read_manifest(manifest["embeddings"]) or {}).get("corpus")
    data = load_split(data_uri, split, corpus_uri,
                      answers_wanted(answer_recall, answer_accuracy))
    device = device or default_device()
    encoder = load_dual_encoder(model_uri, device)
    langs = corpus_langs(data.corpus_uri)
    if search_gpus and kw.get("pairs", True) and len(langs) > 1:
        log.warning("eval: per-language searches restrict FAISS with ID selectors, which GPU "
                    "indexes do not take: the search actors run on CPUs (eval.pairs: false "
                    "searches the pooled corpus on the GPUs)")
        search_gpus = 0.0
    searcher = ShardedSearcher(index_uri, kw.get("nprobe"), kw.get("ef_search"),
                               search_cpus, refine, k_factor, num_gpus=search_gpus,
                               gpus_explicit=gpus_explicit, corpus_uri=data.corpus_uri)
    try:
        out = evaluate_split(encoder, searcher, data, device=device, langs=langs,
                             answer_recall=answer_recall, answer_accuracy=answer_accuracy, **kw)
    finally:
        searcher.close()
    out.update(model=model_uri, index=index_uri, split=split, sources=data.source,
               device=device, host=os.uname().nodename, python=sys.executable)
    return out


# ---------------------------------------------------------------------------- reports
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown_table(result: dict, metrics: list[str]) -> str:
    """One table: language pairs, then macro averages, then query languages (pooled corpus);
    ``n``: the queries scored (the most of any metric family), or the pairs of a macro."""
    cols = [m for m in metrics if any(m in r for r in _groups(result).values())]
    rows: list[tuple[str, dict]] = [(k, v) for k, v in result["pairs"].items()]
    rows += [(f"**macro {k}**", v) for k, v in result["macro"].items() if v.get("groups")]
    rows += [(f"{k} -> pooled", v) for k, v in result.get("query_langs", {}).items()]
    if result.get("query_langs_macro", {}).get("groups"):
        rows.append(("**macro pooled**", result["query_langs_macro"]))
    head = "| pair | n | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in rows:
        n = max((r[c] for c in M.COUNTS if c in r), default=r.get("groups", ""))
        lines.append(f"| {name} | {n} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


CHART_DEFAULTS = ("mrr@10", "r@2kt", "acc@20", "acc@100")


def chart_metric(result: dict, wanted: str | None) -> str:
    """``wanted`` (``eval.chart_metric``), or when None the first of :data:`CHART_DEFAULTS`
    that a pair of ``result`` has (a split without qrels has only answer metrics), else the
    first metric a pair has."""
    if wanted:
        return wanted
    have = [m for r in _groups(result).values() for m in r if m not in M.COUNTS]
    return next((m for m in CHART_DEFAULTS if m in have), have[0] if have else "mrr@10")


def bar_chart(result: dict, metric: str) -> bytes:
    """PNG bar chart of ``metric`` per language pair (cross-lingual pairs darker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(_pair_metrics(result, metric).items())
    if not pairs:
        raise ConfigError(f"eval.chart_metric: no language pair has metric {metric!r}")
    names, values = zip(*pairs, strict=True)
    colors = ["#1f77b4" if a != b else "#aec7e8" for a, b in (n.split("->") for n in names)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, max(1.0, max(values)))
    ax.set_title(f"{metric} per (query -> corpus) language pair")
    for key, ls in (("x->en", "--"), ("cross_lingual", ":")):
        v = result["macro"].get(key, {}).get(metric)
        if v is not None:
            ax.axhline(v, color="k", linestyle=ls, linewidth=1, label=f"macro {key}: {v:.3f}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _groups(result: dict) -> dict[str, dict]:
    """The language pairs' metrics, or where there are none (``eval.pairs: false``) the
    query languages' over the pooled corpus."""
    return result["pairs"] or {f"{k}->pooled": v for k, v in
                               result.get("query_langs", {}).items()}


def _pair_metrics(result: dict, metric: str) -> dict[str, float]:
    return {k: v[metric] for k, v in _groups(result).items() if metric in v}


def comparison_chart(results: dict[str, dict], metric: str) -> bytes:
    """PNG: ``metric`` per language pair, one bar per model side by side (e.g. the untrained
    starting checkpoint, the warm-up and the distilled student)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_model = {name: _pair_metrics(r, metric) for name, r in results.items()}
    pairs = sorted(set().union(*per_model.values()))
    if not pairs:
        raise ConfigError(f"eval.chart_metric: no language pair has metric {metric!r}")
    width = 0.8 / len(per_model)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(pairs) * len(per_model) + 2), 4))
    for i, (name, values) in enumerate(per_model.items()):
        macro = results[name]["macro"].get("x->en", {}).get(metric)
        label = f"{name} (x->en {macro:.3f})" if macro is not None else name
        ax.bar([j + i * width for j in range(len(pairs))],
               [values.get(p, 0.0) for p in pairs], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(pairs))], pairs, rotation=90,
                  fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.0)
    ax.set_title(f"{metric} per (query -> corpus) language pair")
    ax.legend(fontsize=8)
    return _png(fig)


def comparison_table(results: dict[str, dict], metric: str) -> str:
    """Markdown: ``metric`` per language pair (rows) and model (columns), with macros."""
    per_model = {name: _pair_metrics(r, metric) for name, r in results.items()}
    pairs = sorted(set().union(*per_model.values()))
    lines = [f"| {metric} | " + " | ".join(per_model) + " |",
             "|---|" + "---|" * len(per_model)]
    for key in ("x->en", "cross_lingual", "monolingual"):
        cells = [results[m]["macro"].get(key, {}).get(metric) for m in per_model]
        if any(c is not None for c in cells):
            lines.append(f"| macro {key} | " + " | ".join(_fmt(c) for c in cells) + " |")
    for p in pairs:
        lines.append(f"| {p} | " + " | ".join(_fmt(per_model[m].get(p)) for m in per_model)
                     + " |")
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out_uri: str, metrics: list[str], chart: str | None) -> dict:
    """Write ``metrics.json``, ``metrics.md`` (the columns of ``metrics`` the result has),
    ``pairs.png`` (of :func:`chart_metric`), and ``run.parquet`` (pooled top-k) when
    ``result`` holds its ``run`` (else :func:`evaluate_split` wrote it)."""
    run = result.pop("run", None)
    storage.write_json(storage.join(out_uri, "metrics.json"), result)
    storage.write_bytes(storage.join(out_uri, "metrics.md"),
                        markdown_table(result, metrics).encode())
    storage.write_bytes(storage.join(out_uri, "pairs.png"),
                        bar_chart(result, chart_metric(result, chart)))
    if run is not None:
        storage.write_parquet(storage.join(out_uri, "run.parquet"), run_table(run))
    return result


# ---------------------------------------------------------------------------- the job
_HOW = {"model": "set eval.model or --model, or train it first (`qgscale train distill`)",
        "index": "set eval.index or --index, or build it first (`qgscale index build`, or "
                 "`qgscale run --only reindex`)"}


def check_inputs(model_uri: str, index_uri: str, data_uri: str | None = None,
                 splits: list[str] | None = None) -> None:
    """Fail at once (before Ray starts) when the student, its index or a split's queries do
    not exist."""
    for what, uri in (("model", model_uri), ("index", index_uri)):
        if not storage.exists(uri):
            raise MissingInputError(f"eval: {what} {uri} does not exist ({_HOW[what]})")
        if what == "index" and storage.read_manifest(uri) is None:
            raise MissingInputError(f"eval: index {uri} has no {storage.MANIFEST} (an "
                                    f"unfinished build?); {_HOW['index']}")
    for split in splits or []:
        _queries_uri(data_uri, split)


def run_eval(cfg: Any, model_uri: str, index_uri: str, data_uri: str, out_uri: str,
             splits: list[str]) -> dict:
    """Stage function ``eval``: ``model_uri`` with ``index_uri`` on ``splits`` of the prepared
    data at ``data_uri`` (``cfg.eval`` settings).

    Writes one report folder per split under ``out_uri`` (``out_uri/<split>/``) and a
    ``_manifest.json``; returns ``{split: metrics}``.
    """
    from qgscale.index.search import search_resources
    from qgscale.runtime import bundles, check_shared, connect, requesting

    ec = cfg.eval
    check_inputs(model_uri, index_uri, data_uri, splits)
    import ray

    connect(cfg.ray)
    check_shared({"model": model_uri, "index": index_uri, "data": data_uri}, {"out": out_uri})
    sc = cfg.index.search
    shards, coder = search_resources(index_uri, sc)
    task = ray.remote(_evaluate_task).options(**coder.options())
    names = report_names(ec.k)
    results = {}
    for split in splits:
        t0 = time.time()
        with requesting("index.search", bundles(shards) + bundles(coder)):
            result = ray.get(task.remote(
                coder.num_gpus, model_uri, index_uri, data_uri, split,
                top_k=ec.top_k, ks=ec.k, batch_size=sc.batch_size, pairs=ec.pairs,
                nprobe=sc.nprobe, ef_search=sc.ef_search, refine=sc.refine,
                k_factor=sc.k_factor, precision=sc.precision, answer_recall=ec.answer_recall,
                answer_accuracy=ec.answer_accuracy,
                search_cpus=shards.num_cpus, search_gpus=shards.num_gpus,
                gpus_explicit=bool(sc.gpus_per_actor),
                run_uri=storage.join(out_uri, split, "run.parquet")))
        result["timings"]["total_s"] = time.time() - t0
        result["job"] = {"driver_python": sys.executable, "driver_host": os.uname().nodename,
                         "ray_address": ray.get_runtime_context().gcs_address,
                         "job_id": ray.get_runtime_context().get_job_id()}
        write_reports(result, storage.join(out_uri, split), names, ec.chart_metric)
        results[split] = result
        print(markdown_table(result, names), flush=True)
    storage.write_manifest(out_uri, storage.config_hash(
        {"eval": ec, "model": model_uri, "index": index_uri}), model=model_uri, index=index_uri,
        data=data_uri,
        splits={s: {"macro": r["macro"], "query_langs_macro": r.get("query_langs_macro")}
                for s, r in results.items()})
    return results


def _evaluate_task(num_gpus: float, *args: Any, **kw: Any) -> dict:
    """:func:`evaluate_uris` as a Ray task given ``num_gpus`` GPUs."""
    from qgscale.runtime import actor_device

    return evaluate_uris(*args, device=actor_device(num_gpus), **kw)


def summary_json(results: dict) -> str:
    return json.dumps({s: r["macro"] for s, r in results.items()}, indent=2)
