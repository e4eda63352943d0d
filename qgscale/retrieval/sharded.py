"""BM25 over a corpus' parquet shards on Ray, and what the ``bm25`` / ``bm25-eval`` stages
make of it.

Shard jobs (:func:`qgscale.runtime.run_shards`: done markers, resume, a dead actor's shard
retried) over the corpus shards, with the plain functions of :mod:`qgscale.retrieval.bm25`:

1. :class:`StatsJob`: a corpus shard's term statistics, restricted to the queries' tokens,
   as ``{token, df}`` (N and lengths in its done marker); the driver sums them
   (:func:`_global_stats`): the *global* statistics;
2. :class:`SearchJob`: the shard's top-k for every query, scored with the global statistics
   (per corpus language when asked: each language's passages indexed alone, same scores, an
   exact restriction like the dense eval's FAISS ID selector), and, when answers are given,
   whether each retrieved passage contains one (``qgscale.retrieval.answers``, DPR's match,
   on the passage text without its title, as DPR built its training data).

Every shard's search output has the same rows in the same order (query-major: each query's
pooled row, or one row per corpus language, empty where the shard has none of it), so the
lists fold into the overall top-k row by row (ties by pid, the order of one index over the
whole corpus; :func:`merge_rows`, one Arrow sort). A tree of :class:`MergeJob` shard jobs on
the actors folds groups of :data:`FAN_IN` outputs, level by level, until at most that many
are left; the driver folds those a block of queries at a time, reading each one's rows of
that block only: it holds one block's lists (:data:`FOLD_ENTRIES` in all), never the
corpus nor every query's top-k, and reads ``FAN_IN x queries x k`` entries in all, not
``corpus shards x queries x k``; the stages stream the blocks to their output. An actor holds
its shard and that shard's top-k for every query (Arrow, built :data:`SEARCH_BLOCK` queries
at a time), or a merge's output. The work folder is removed once the merged result is
written.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.schema import QRELS, TRAIN_EXAMPLES, passage_text
from qgscale.errors import DataError, MissingInputError
from qgscale.retrieval import bm25 as B
from qgscale.retrieval.answers import YES_NO, answer_match_examples, read_answers
from qgscale.runtime import Shard, map_shards, run_shards

log = logging.getLogger("qgscale")

STATS = pa.schema([("token", pa.string()), ("df", pa.int64())])
HITS = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("pids", pa.list_(pa.string())),
                  ("scores", pa.list_(pa.float32())), ("hits", pa.list_(pa.bool_()))])
# a BM25 run: one row per query (lang ""), and per (query, corpus language) with pairs
RUN = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("pids", pa.list_(pa.string())),
                 ("scores", pa.list_(pa.float32()))])

Ranked = list[tuple[float, str, bool]]  # (-score, pid, has answer), best first
Block = dict[tuple[str, str], Ranked]  # {(qid, "" or corpus lang): ranked} of some queries

SEARCH_BLOCK = 8192  # queries an actor searches before turning their lists into Arrow
FOLD_ENTRIES = 1 << 21  # ranked entries folded at a time, all inputs (inputs x rows x k)
STATS_CHUNK = 256  # statistics shards summed at a time on the driver
FAN_IN = 16  # search outputs a merge job (or the driver, at the end) folds
WORK_FORMAT = "v2"  # search work rows: query-major, every view (older work is redone)


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
    """Pass 2: a corpus shard's top ``k`` per query with the global ``stats``, for each view
    of ``views`` (``[""]``: the pooled shard; else every corpus language, each indexed
    alone); answer hits with ``answers``. Rows: query-major, a row per (query, view)."""

    qids: list[str]
    queries: list[str]
    stats: B.Stats
    k: int
    k1: float
    b: float
    views: list[str]
    answers: dict[str, list[str]] | None
    match: str
    block: int  # queries searched before their lists become Arrow (:data:`SEARCH_BLOCK`)

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: Shard) -> pa.Table:
        pids, langs, texts, bare = _read_corpus(shard.payload)
        groups: dict[str, list[int]] = {v: [] for v in self.views}
        for i, lang in enumerate(langs):
            view = lang if self.views != [""] else ""
            if view not in groups:
                raise DataError(f"{shard.payload}: passage {pids[i]!r} has language {lang!r}, "
                                f"not one of the corpus languages {self.views} this search "
                                "was planned for (the corpus changed under it?)")
            groups[view].append(i)
        parts = []
        for view in self.views:  # view-major here, reordered below
            rows = groups[view]
            index = B.index_shard([texts[i] for i in rows], [pids[i] for i in rows])
            row_of = {pids[i]: i for i in rows} if self.answers is not None else {}
            for start in range(0, len(self.qids), self.block):
                qids = self.qids[start:start + self.block]
                if not rows:  # none of this language here: empty lists, nothing to search
                    found, scores = [[] for _ in qids], [np.zeros(0, np.float32)] * len(qids)
                else:
                    found, scores = index.search(self.queries[start:start + self.block],
                                                 self.stats, self.k, self.k1, self.b)
                hits: dict[str, set[str]] = {}
                if self.answers is not None:
                    text_of = {p: bare[row_of[p]] for ps in found for p in ps}
                    hits = {r["qid"]: set(r["pos_pids"]) for r in answer_match_examples(
                        qids, self.answers, dict(zip(qids, found, strict=True)), text_of,
                        n_neg=0, match=self.match)}
                parts.append(pa.table({
                    "qid": qids, "lang": [view] * len(qids), "pids": found,
                    "scores": [s.tolist() for s in scores],
                    "hits": [[p in hits.get(q, ()) for p in ps]
                             for q, ps in zip(qids, found, strict=True)]}, schema=HITS))
        table = pa.concat_tables(parts) if parts else HITS.empty_table()
        nv, nq = len(self.views), len(self.qids)
        return table.take(np.arange(nv * nq).reshape(nv, nq).T.ravel())


def _global_stats(uri: str, key: str, names: Sequence[str]) -> B.Stats:
    """The corpus' statistics: the :class:`StatsJob` shards ``names`` under ``uri``, read
    per shard (:func:`qgscale.runtime.map_shards`: on Ray tasks for remote or many files)
    and summed in Arrow
    :data:`STATS_CHUNK` shards at a time (then ``merge_stats``): at 10k corpus shards,
    seconds, not a round trip and a dict update per token of each shard after another."""
    writer = storage.ShardWriter(uri, key)
    markers = writer.markers()
    tables = map_shards(storage.read_parquet, [writer.shard_uri(n) for n in names])

    def chunk(part: Sequence[str]) -> B.Stats:
        t = pa.concat_tables([next(tables) for _ in part])
        t = t.group_by("token").aggregate([("df", "sum")])
        tokenizers = sorted({markers[n]["tokenizer"] for n in part})
        if len(tokenizers) > 1:
            raise ValueError(f"{uri}: statistics of tokenizers {tokenizers} cannot be merged")
        return B.Stats(dict(zip(t.column("token").to_pylist(), t.column("df_sum").to_pylist(),
                                strict=True)), sum(markers[n]["n_docs"] for n in part),
                       sum(markers[n]["total_len"] for n in part), tokenizers[0])

    return B.merge_stats(chunk(names[i:i + STATS_CHUNK])
                         for i in range(0, len(names), STATS_CHUNK))


def merge_rows(tables: Sequence[pa.Table], k: int) -> pa.Table:
    """Row ``i`` of every table of :data:`HITS` rows merged into its top ``k`` (score desc,
    pid asc: a single index's order), hits kept: the tables hold the same ``(qid, lang)``
    rows in the same order (the caller checks). Vectorised: one Arrow sort of the lists."""
    first = tables[0]
    parts = []
    for t in tables:
        pids, scores, hits = (_one_chunk(t.column(c)) for c in ("pids", "scores", "hits"))
        parts.append(pa.table({"row": pc.list_parent_indices(pids),
                               "pid": pc.list_flatten(pids), "score": pc.list_flatten(scores),
                               "hit": pc.list_flatten(hits)}))
    flat = pa.concat_tables(parts)
    order = pc.sort_indices(flat, sort_keys=[("row", "ascending"), ("score", "descending"),
                                             ("pid", "ascending")])
    counts = np.bincount(flat.column("row").to_numpy(), minlength=first.num_rows)
    rank = np.arange(flat.num_rows) - np.repeat(np.cumsum(counts) - counts, counts)
    flat = flat.take(order.filter(pa.array(rank < k)))  # the kept entries only
    offsets = pa.array(np.concatenate([[0], np.cumsum(np.minimum(counts, k))]), pa.int32())
    return pa.table({"qid": first.column("qid"), "lang": first.column("lang"),
                     **{name: pa.ListArray.from_arrays(offsets, _one_chunk(flat.column(col)))
                        for name, col in (("pids", "pid"), ("scores", "score"),
                                          ("hits", "hit"))}}, schema=HITS)


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _read_block(uris: Sequence[str], start: int, stop: int) -> list[pa.Table]:
    """Rows ``[start, stop)`` of every search output of ``uris``, which must be the same
    ``(qid, lang)`` rows (the queries x views of one search)."""
    tables = []
    for uri in uris:
        try:
            t = storage.read_rows(uri, start, stop)
        except ValueError:  # fewer rows than the queries x views of this search
            t = None
        if t is None or (tables and not all(t.column(c).equals(tables[0].column(c))
                                             for c in ("qid", "lang"))):
            work = posixpath.dirname(posixpath.dirname(uri))
            raise DataError(f"{uri}: its rows are not the queries x views of this search "
                            f"(a work file of another run?): remove {work} and rerun")
        tables.append(t)
    return tables


@dataclass
class MergeJob:
    """A group of search outputs (the same ``rows`` rows in the same order) merged into each
    row's top ``k``, ``block`` rows at a time: a level of the tree of merges that leaves the
    driver :data:`FAN_IN` outputs at most to fold, whatever the number of corpus shards."""

    rows: int
    k: int
    block: int

    def setup(self, device: str, threads: int) -> None:
        return None

    def run(self, state: None, shard: Shard) -> pa.Table:
        parts = [merge_rows(_read_block(shard.payload, a, min(a + self.block, self.rows)),
                            self.k) for a in range(0, self.rows, self.block)]
        return pa.concat_tables(parts) if parts else HITS.empty_table()


def merge_tree(in_uri: str, names: Sequence[str], rows: int, k: int, work_uri: str,
               key: str, common: Mapping[str, Any], fan_in: int) -> list[str]:
    """The search outputs ``names`` (shards under ``in_uri`` with ``key``) merged on the
    actors, groups of at most ``fan_in`` per job and level by level, until ``fan_in``
    outputs at most are left (their uris): the driver then reads ``fan_in x queries x k``
    entries, not ``corpus shards x queries x k``. Every level is a :func:`run_shards` pass of
    :class:`MergeJob` under ``work_uri/merge-<level>``, resumable under a key of its inputs'
    sha256 and ``fan_in`` (a redone input, or other groups, redo the merges built on it)."""
    if fan_in < 2:
        raise ValueError(f"fan_in={fan_in}: a merge needs 2 inputs at least")
    writer, names, level = storage.ShardWriter(in_uri, key), list(names), 0
    while len(names) > fan_in:
        level += 1
        markers = writer.markers()
        key = storage.config_hash({"fan_in": fan_in, "inputs": [markers[n]["sha256"]
                                                                for n in names]})
        groups = np.array_split(np.arange(len(names)), -(-len(names) // fan_in))
        units = [Shard(storage.shard_name(i), len(g),
                       tuple(writer.shard_uri(names[j]) for j in g))
                 for i, g in enumerate(groups)]
        block = max(1, FOLD_ENTRIES // (max(len(g) for g in groups) * k))
        out = storage.join(work_uri, f"merge-{level}")
        run_shards(MergeJob(rows, k, block), units, out, key,
                   desc=f"bm25 merge {level}", **common)
        writer, names = storage.ShardWriter(out, key), [u.name for u in units]
    return [writer.shard_uri(n) for n in names]


def retrieve(corpus_uri: str, qids: Sequence[str], queries: Sequence[str], k: int,
             work_uri: str, key: str, bm25_cfg: Any, *, langs: Sequence[str] | None = None,
             answers: Mapping[str, Sequence[str]] | None = None, block: int | None = None,
             fan_in: int = FAN_IN) -> Iterator[Block]:
    """Top ``k`` of every query over the corpus at ``corpus_uri`` (global statistics), in
    blocks of queries in the order given: ``{(qid, ""): ranked}``, plus ``{(qid, lang):
    ranked}`` for each corpus language of ``langs`` (each key in that order). ``block``:
    queries per block (default: :data:`FOLD_ENTRIES` ranked entries of the outputs folded).
    The corpus shards' lists are merged on the actors (:func:`merge_tree`, ``fan_in``)
    before the driver folds the last few. Work shards go under ``work_uri`` (resumable with
    the same ``key``; the caller removes them: :func:`cleanup`)."""
    if len(set(qids)) != len(qids):
        raise DataError(f"BM25: duplicate query ids in {len(qids)} queries")
    shards = _corpus_shards(corpus_uri)
    bc = bm25_cfg
    common = dict(actors=bc.model_copy(update={"gpus_per_actor": 0}), stage="bm25",
                  unit="shard")
    stats_uri, search_uri = storage.join(work_uri, "stats"), storage.join(work_uri, "search")
    run_shards(StatsJob(frozenset(B.query_vocab(queries))), shards, stats_uri, key,
               desc="bm25 statistics", **common)
    stats = _global_stats(stats_uri, key, [s.name for s in shards])
    log.info("bm25: %d passages in %d shard(s), %d query tokens, avgdl %.1f", stats.n_docs,
             len(shards), len(stats.df), stats.avgdl)
    ans = {q: list(a) for q, a in answers.items()} if answers is not None else None
    views = sorted(set(langs)) if langs else [""]
    search_key = f"{key}/{WORK_FORMAT}"
    job = SearchJob(list(qids), list(queries), stats, k, bc.k1, bc.b, views, ans, bc.match,
                    SEARCH_BLOCK)
    run_shards(job, shards, search_uri, search_key, desc="bm25 search", **common)
    nv = len(views)
    uris = merge_tree(search_uri, [s.name for s in shards], len(qids) * nv, k, work_uri,
                      search_key, common, fan_in)
    block = block or max(1, FOLD_ENTRIES // (len(uris) * nv * k))
    for start in range(0, len(qids), block):
        part = list(qids[start:start + block])
        merged = merge_rows(_read_block(uris, start * nv, (start + len(part)) * nv), k)
        if merged.column("qid").to_pylist() != [q for q in part for _ in views] or \
                merged.column("lang").to_pylist() != views * len(part):
            raise DataError(f"{uris[0]}: its rows are not the queries x views of this search "
                            f"(a work file of another run?): remove {work_uri} and rerun")
        lists = [[(-s, p, h) for p, s, h in zip(*x, strict=True)] for x in zip(
            *(merged.column(c).to_pylist() for c in ("pids", "scores", "hits")), strict=True)]
        out: Block = {}
        for i, qid in enumerate(part):
            mine = lists[i * nv:(i + 1) * nv]
            out[(qid, "")] = (list(itertools.islice(heapq.merge(*mine), k)) if langs
                              else mine[0])
            if langs:
                out.update({(qid, v): lst for v, lst in zip(views, mine, strict=True)})
        yield out


def cleanup(work_uri: str) -> None:
    """Remove :func:`retrieve`'s work folder (statistics, search, merges)."""
    storage.remove(work_uri, recursive=True)


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
    top ``bm25.top_k``: ``out_uri/examples`` (TRAIN_EXAMPLES, streamed block by block) and
    ``out_uri/qrels`` (their positives, rel 1, read back from the examples) for the stages
    that read qrels."""
    bc = cfg.bm25
    q = _read_table(queries_uri, "training queries")
    if not storage.exists(answers_uri):
        raise MissingInputError(f"{answers_uri}: answers (bm25.positives: answers needs them) "
                                "not found")
    answers = read_answers(answers_uri)
    qids, texts = q.column("qid").to_pylist(), q.column("text").to_pylist()
    queries = [training_query(t, answers.get(i) or [], bc.train_query)
               for i, t in zip(qids, texts, strict=True)]
    del q, texts
    work = storage.join(out_uri, "work")
    counts: Counter[str] = Counter()

    def examples() -> Iterator[dict[str, Any]]:
        for ranked in retrieve(corpus_uri, qids, queries, bc.top_k, work, key, bc,
                               answers=answers):
            for row in answer_examples({qid: lst for (qid, _), lst in ranked.items()},
                                       bc.n_positives, bc.n_negatives):
                counts.update(examples=1, positives=len(row["pos_pids"]),
                              negatives=len(row["neg_pids"]))
                yield row

    examples_uri = storage.join(out_uri, "examples")
    written = storage.ShardWriter(examples_uri, key).write_rows(examples(), cfg.data.shard_rows,
                                                                TRAIN_EXAMPLES)
    if not counts["examples"]:
        storage.remove(examples_uri, recursive=True)  # not a finished output
        raise DataError(f"{queries_uri}: no training query has an answer in any of its top "
                        f"{bc.top_k} BM25 passages of {corpus_uri} (bm25.top_k, "
                        "bm25.train_query)")

    def qrels() -> Iterator[dict[str, Any]]:
        for shard in written["shards"]:  # one shard at a time
            t = storage.read_parquet(storage.join(examples_uri, shard["file"]),
                                     ["qid", "pos_pids"])
            for qid, pos in zip(*(t.column(c).to_pylist() for c in t.column_names),
                                strict=True):
                yield from ({"qid": qid, "pid": p, "rel": 1} for p in pos)

    storage.ShardWriter(storage.join(out_uri, "qrels"), key).write_rows(
        qrels(), cfg.data.shard_rows, QRELS)
    cleanup(work)
    with_answers = sum(1 for qid in qids if any(
        x.strip().lower() not in YES_NO and x.strip() for x in answers.get(qid) or []))
    summary = {"queries": len(qids), "with_span_answers": with_answers,
               "examples": counts["examples"], "no_positive": len(qids) - counts["examples"],
               "positives": counts["positives"], "negatives": counts["negatives"]}
    log.info("bm25: %d of %d training queries have an answer-matching passage in their top "
             "%d (%d positives)", counts["examples"], len(qids), bc.top_k, counts["positives"])
    return storage.write_manifest(out_uri, key, **summary)


# ------------------------------------------------------------------ stage bm25-eval
def run_bm25_eval(cfg: Any, queries_uri: str, corpus_uri: str, out_uri: str, key: str
                  ) -> dict[str, Any]:
    """The BM25 run of one eval split: ``out_uri/run.parquet`` (:data:`RUN`: ``eval.top_k``
    per query over the pooled corpus, lang ""; with ``eval.pairs`` and several corpus
    languages also per corpus language), sorted by (qid, lang), streamed a block at a time."""
    from qgscale.eval.evaluate import corpus_langs

    q = _read_table(queries_uri, "eval queries").sort_by("qid")
    qids, texts = q.column("qid").to_pylist(), q.column("text").to_pylist()
    del q
    langs = corpus_langs(corpus_uri) if cfg.eval.pairs else []
    langs = langs if len(langs) > 1 else None
    work = storage.join(out_uri, "work")
    rows = 0
    with storage.parquet_sink(storage.join(out_uri, "run.parquet"), RUN) as write:
        for ranked in retrieve(corpus_uri, qids, texts, cfg.eval.top_k, work, key, cfg.bm25,
                               langs=langs):
            keys = list(ranked)  # (qid, "") first, then its languages: sorted
            write(pa.table({"qid": [q for q, _ in keys], "lang": [x for _, x in keys],
                            "pids": [[p for _, p, _ in ranked[x]] for x in keys],
                            "scores": [[-s for s, _, _ in ranked[x]] for x in keys]},
                           schema=RUN))
            rows += len(keys)
    cleanup(work)
    return storage.write_manifest(out_uri, key, queries=queries_uri, corpus=corpus_uri,
                                  by_lang=langs is not None, rows=rows)


def read_run(uri: str, block: int) -> Iterator[tuple[dict[str, dict[str, float]],
                                                      dict[str, dict[str, dict]]]]:
    """A :data:`RUN` file (a query's rows together, as :func:`run_bm25_eval` writes them)
    ``block`` queries at a time: ``(pooled run, {corpus lang: run})`` (runs: ``{qid: {pid:
    score}}``), read a row group at a time."""
    import pyarrow.parquet as pq

    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise MissingInputError(f"{uri}: BM25 run not found (run stage bm25-eval)")
    pooled: dict[str, dict[str, float]] = {}
    per_lang: dict[str, dict[str, dict[str, float]]] = {}
    last = None
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=storage.ROW_GROUP_ROWS,
                                                    columns=RUN.names):
            for qid, lang, pids, scores in zip(*(batch.column(c).to_pylist()
                                                 for c in RUN.names), strict=True):
                if qid != last and len(pooled) >= block:
                    yield pooled, per_lang
                    pooled, per_lang = {}, {}
                last = qid
                run = dict(zip(pids, scores, strict=True))
                if lang:
                    per_lang.setdefault(lang, {})[qid] = run
                else:
                    pooled[qid] = run
    if pooled or per_lang:
        yield pooled, per_lang
