"""BM25 over a corpus' parquet shards on Ray, and what the ``bm25`` / ``bm25-eval`` stages
make of it.

Two shard jobs (:func:`qgscale.runtime.run_shards`: done markers, resume, a dead actor's
shard retried) over the corpus shards, with the plain functions of
:mod:`qgscale.retrieval.bm25`:

1. :class:`StatsJob`: a corpus shard's term statistics, restricted to the queries' tokens,
   as ``{token, df}`` (N and lengths in its done marker); the driver sums them
   (``merge_stats``): the *global* statistics;
2. :class:`SearchJob`: the shard's top-k for every query, scored with the global statistics
   (per corpus language when asked: each language's passages indexed alone, same scores, an
   exact restriction like the dense eval's FAISS ID selector), and, when answers are given,
   whether each retrieved passage contains one (``qgscale.retrieval.answers``, DPR's match,
   on the passage text without its title, as DPR built its training data).

The driver folds the shards' lists into the overall top-k one shard at a time (ties by pid,
the order of one index over the whole corpus): it holds queries x k entries, never the
corpus. The work folders are removed once the merged result is written.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qgscale import storage
from qgscale.data.schema import QRELS, TRAIN_EXAMPLES, passage_text
from qgscale.errors import DataError, MissingInputError
from qgscale.retrieval import bm25 as B
from qgscale.retrieval.answers import YES_NO, answer_match_examples, read_answers
from qgscale.runtime import Shard, run_shards

log = logging.getLogger("qgscale")

STATS = pa.schema([("token", pa.string()), ("df", pa.int64())])
HITS = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("pids", pa.list_(pa.string())),
                  ("scores", pa.list_(pa.float32())), ("hits", pa.list_(pa.bool_()))])
# a BM25 run: one row per query (lang ""), and per (query, corpus language) with pairs
RUN = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("pids", pa.list_(pa.string())),
                 ("scores", pa.list_(pa.float32()))])

Ranked = list[tuple[float, str, bool]]  # (-score, pid, has answer), best first


def _corpus_shards(corpus_uri: str) -> list[Shard]:
    files = storage.list_files(corpus_uri, ".parquet")
    if not files:
        raise MissingInputError(f"{corpus_uri}: no corpus parquet shards")
    return [Shard(posixpath.basename(f)[: -len(".parquet")], 1, f) for f in files]


def _read_corpus(uri: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """pids, langs, "title text" (what BM25 indexes), text alone (what answers match)."""
    t = storage.read_parquet(uri, ["pid", "lang", "title", "text"])
    pids, langs, titles, texts = (t.column(c).to_pylist() for c in ("pid", "lang", "title",
                                                                     "text"))
    return pids, langs, [passage_text(a, b) for a, b in zip(titles, texts, strict=True)], \
        [x or "" for x in texts]


@dataclass
class StatsJob:
    """Pass 1: a corpus shard's statistics for the query tokens ``vocab``."""

    vocab: frozenset[str]

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: Shard) -> tuple[pa.Table, dict]:
        _, _, texts, _ = _read_corpus(shard.payload)
        s = B.shard_stats(texts, self.vocab)
        table = pa.table({"token": list(s.df), "df": list(s.df.values())}, schema=STATS)
        return table, {"n_docs": s.n_docs, "total_len": s.total_len, "tokenizer": s.tokenizer,
                       "source": shard.payload}


@dataclass
class SearchJob:
    """Pass 2: a corpus shard's top ``k`` per query with the global ``stats``; per corpus
    language with ``by_lang``; answer hits with ``answers``."""

    qids: list[str]
    queries: list[str]
    stats: B.Stats
    k: int
    k1: float
    b: float
    by_lang: bool
    answers: dict[str, list[str]] | None
    match: str

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: Shard) -> pa.Table:
        pids, langs, texts, bare = _read_corpus(shard.payload)
        groups: dict[str, list[int]] = {}
        for i, lang in enumerate(langs):
            groups.setdefault(lang if self.by_lang else "", []).append(i)
        out: dict[str, list] = {c: [] for c in HITS.names}
        for lang, rows in sorted(groups.items()):
            index = B.index_shard([texts[i] for i in rows], [pids[i] for i in rows])
            found, scores = index.search(self.queries, self.stats, self.k, self.k1, self.b)
            hits: dict[str, set[str]] = {}
            if self.answers is not None:
                wanted = {p for ps in found for p in ps}
                text_of = {pids[i]: bare[i] for i in rows if pids[i] in wanted}
                retrieved = dict(zip(self.qids, found, strict=True))
                hits = {r["qid"]: set(r["pos_pids"]) for r in answer_match_examples(
                    self.qids, self.answers, retrieved, text_of, n_neg=0, match=self.match)}
            for qid, ps, ss in zip(self.qids, found, scores, strict=True):
                h = hits.get(qid, set())
                out["qid"].append(qid)
                out["lang"].append(lang)
                out["pids"].append(ps)
                out["scores"].append(ss.tolist())
                out["hits"].append([p in h for p in ps])
        return pa.table(out, schema=HITS)


def _fold(into: dict[tuple[str, str], Ranked], table: pa.Table, k: int) -> None:
    """Merge one shard's lists into the running top ``k`` (score desc, pid asc)."""
    for qid, lang, pids, scores, hits in zip(*(table.column(c).to_pylist() for c in HITS.names),
                                             strict=True):
        new = [(-float(s), p, h) for p, s, h in zip(pids, scores, hits, strict=True)]
        old = into.get((qid, lang), [])
        into[(qid, lang)] = list(itertools.islice(heapq.merge(old, new), k)) if old else new


def retrieve(corpus_uri: str, qids: Sequence[str], queries: Sequence[str], k: int,
             work_uri: str, key: str, bm25_cfg: Any, *, by_lang: bool = False,
             answers: Mapping[str, Sequence[str]] | None = None,
             ) -> dict[tuple[str, str], Ranked]:
    """Top ``k`` of every query over the corpus at ``corpus_uri`` (global statistics):
    ``{(qid, ""): ranked}``, plus ``{(qid, corpus lang): ranked}`` with ``by_lang``. Work
    shards go under ``work_uri`` (resumable with the same ``key``; removed at the end)."""
    if len(set(qids)) != len(qids):
        raise DataError(f"BM25: duplicate query ids in {len(qids)} queries")
    shards = _corpus_shards(corpus_uri)
    bc = bm25_cfg
    common = dict(actors=bc.model_copy(update={"gpus_per_actor": 0}), stage="bm25",
                  unit="shard")
    stats_uri, search_uri = storage.join(work_uri, "stats"), storage.join(work_uri, "search")
    run_shards(StatsJob(frozenset(B.query_vocab(queries))), shards, stats_uri, key,
               desc="bm25 statistics", **common)
    writer = storage.ShardWriter(stats_uri, key)
    markers = writer.markers()

    def shard_stats(s: Shard) -> B.Stats:
        marker = markers[s.name]
        t = storage.read_parquet(writer.shard_uri(s.name))
        return B.Stats(dict(zip(t.column("token").to_pylist(), t.column("df").to_pylist(),
                                strict=True)), marker["n_docs"], marker["total_len"],
                       marker["tokenizer"])

    stats = B.merge_stats(shard_stats(s) for s in shards)  # one shard's counts at a time
    log.info("bm25: %d passages in %d shard(s), %d query tokens, avgdl %.1f", stats.n_docs,
             len(shards), len(stats.df), stats.avgdl)
    ans = {q: list(a) for q, a in answers.items()} if answers is not None else None
    run_shards(SearchJob(list(qids), list(queries), stats, k, bc.k1, bc.b, by_lang, ans,
                         bc.match), shards, search_uri, key, desc="bm25 search", **common)
    merged: dict[tuple[str, str], Ranked] = {}
    writer = storage.ShardWriter(search_uri, key)
    for s in shards:
        _fold(merged, storage.read_parquet(writer.shard_uri(s.name)), k)
    if by_lang:  # the pooled list of each query: the best of its per-language lists
        pooled: dict[str, list[Ranked]] = {}
        for (qid, _), ranked in merged.items():
            pooled.setdefault(qid, []).append(ranked)
        merged.update({(qid, ""): list(itertools.islice(heapq.merge(*lists), k))
                       for qid, lists in pooled.items()})
    for qid in qids:
        merged.setdefault((qid, ""), [])
    return merged


def cleanup(work_uri: str) -> None:
    for part in ("stats", "search"):
        storage.remove(storage.join(work_uri, part), recursive=True)


def _read_table(uri: str, what: str) -> pa.Table:
    if not storage.exists(uri):
        raise MissingInputError(f"{uri}: {what} not found")
    return storage.read_parquet(uri)


# ------------------------------------------------------------------ stage bm25 (training)
def training_query(text: str, answers: Sequence[str], mode: str) -> str:
    """The BM25 query of a training question: the question, or it and its answers."""
    if mode == "question":
        return text
    return " ".join([text, *(a for a in answers if a.strip().lower() not in YES_NO)])


def answer_examples(ranked: Mapping[str, Ranked], n_pos: int | None, n_neg: int
                    ) -> list[dict[str, Any]]:
    """TRAIN_EXAMPLES rows: per query its first ``n_pos`` (all: None) answer-matching
    passages in rank order, and its first ``n_neg`` non-matching ones; queries without a
    matching passage get no row."""
    rows = []
    for qid, lst in ranked.items():
        pos = [p for _, p, h in lst if h][:n_pos]
        if pos:
            rows.append({"qid": qid, "pos_pids": pos,
                         "neg_pids": [p for _, p, h in lst if not h][:n_neg]})
    return rows


def run_bm25_train(cfg: Any, queries_uri: str, answers_uri: str, corpus_uri: str,
                   out_uri: str, key: str) -> dict[str, Any]:
    """Stage ``bm25``: answer-match training examples of the training queries over BM25's
    top ``bm25.top_k``: ``out_uri/examples`` (TRAIN_EXAMPLES) and ``out_uri/qrels`` (their
    positives, rel 1) for the stages that read qrels."""
    bc = cfg.bm25
    q = _read_table(queries_uri, "training queries")
    if not storage.exists(answers_uri):
        raise MissingInputError(f"{answers_uri}: answers (bm25.positives: answers needs them) "
                                "not found")
    answers = read_answers(answers_uri)
    qids, texts = q.column("qid").to_pylist(), q.column("text").to_pylist()
    queries = [training_query(t, answers.get(i) or [], bc.train_query)
               for i, t in zip(qids, texts, strict=True)]
    work = storage.join(out_uri, "work")
    ranked = retrieve(corpus_uri, qids, queries, bc.top_k, work, key, bc, answers=answers)
    rows = answer_examples({qid: ranked[(qid, "")] for qid in qids}, bc.n_positives,
                           bc.n_negatives)
    if not rows:
        raise DataError(f"{queries_uri}: no training query has an answer in any of its top "
                        f"{bc.top_k} BM25 passages of {corpus_uri} (bm25.top_k, "
                        "bm25.train_query)")
    storage.ShardWriter(storage.join(out_uri, "examples"), key).write_rows(
        rows, cfg.data.shard_rows, TRAIN_EXAMPLES)
    storage.ShardWriter(storage.join(out_uri, "qrels"), key).write_rows(
        ({"qid": r["qid"], "pid": p, "rel": 1} for r in rows for p in r["pos_pids"]),
        cfg.data.shard_rows, QRELS)
    cleanup(work)
    with_answers = sum(1 for qid in qids if any(
        x.strip().lower() not in YES_NO and x.strip() for x in answers.get(qid) or []))
    n_pos = sum(len(r["pos_pids"]) for r in rows)
    summary = {"queries": len(qids), "with_span_answers": with_answers, "examples": len(rows),
               "no_positive": len(qids) - len(rows), "positives": n_pos,
               "negatives": sum(len(r["neg_pids"]) for r in rows)}
    log.info("bm25: %d of %d training queries have an answer-matching passage in their top "
             "%d (%d positives)", len(rows), len(qids), bc.top_k, n_pos)
    return storage.write_manifest(out_uri, key, **summary)


# ------------------------------------------------------------------ stage bm25-eval
def run_bm25_eval(cfg: Any, queries_uri: str, corpus_uri: str, out_uri: str, key: str
                  ) -> dict[str, Any]:
    """The BM25 run of one eval split: ``out_uri/run.parquet`` (:data:`RUN`: ``eval.top_k``
    per query over the pooled corpus, lang ""; with ``eval.pairs`` and several corpus
    languages also per corpus language)."""
    from qgscale.eval.evaluate import corpus_langs

    q = _read_table(queries_uri, "eval queries")
    qids, texts = q.column("qid").to_pylist(), q.column("text").to_pylist()
    by_lang = cfg.eval.pairs and len(corpus_langs(corpus_uri)) > 1
    work = storage.join(out_uri, "work")
    ranked = retrieve(corpus_uri, qids, texts, cfg.eval.top_k, work, key, cfg.bm25,
                      by_lang=by_lang)
    rows = sorted(ranked.items())
    table = pa.table({"qid": [q for (q, _), _ in rows], "lang": [x for (_, x), _ in rows],
                      "pids": [[p for _, p, _ in r] for _, r in rows],
                      "scores": [[-s for s, _, _ in r] for _, r in rows]}, schema=RUN)
    storage.write_parquet(storage.join(out_uri, "run.parquet"), table)
    cleanup(work)
    return storage.write_manifest(out_uri, key, queries=queries_uri, corpus=corpus_uri,
                                  by_lang=by_lang, rows=table.num_rows)


def read_run(uri: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict]]]:
    """A :data:`RUN` file as ``(pooled run, {corpus lang: run})`` (runs: ``{qid: {pid:
    score}}``)."""
    t = storage.read_parquet(uri)
    pooled: dict[str, dict[str, float]] = {}
    per_lang: dict[str, dict[str, dict[str, float]]] = {}
    for qid, lang, pids, scores in zip(*(t.column(c).to_pylist() for c in RUN.names),
                                       strict=True):
        run = dict(zip(pids, scores, strict=True))
        if lang:
            per_lang.setdefault(lang, {})[qid] = run
        else:
            pooled[qid] = run
    return pooled, per_lang
