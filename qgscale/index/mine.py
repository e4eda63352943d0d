"""Candidate and hard-negative mining: top-k retrieval for training queries, positives dropped.

Outputs under ``out_uri``:
``candidates/`` CANDIDATES ``{qid, pids, scores}`` (top-k, positives removed; the teacher
scores these) and ``train/`` TRAIN_EXAMPLES ``{qid, pos_pids, neg_pids}`` (hard negatives =
candidates ranked ``skip_top .. skip_top + n_negatives``; queries without a positive get
candidates but no training example, and are counted in the manifest).

For answer-supervised data (XOR-TyDi, MKQA: positives made by answer match, the ``bm25``
stage) an :class:`AnswerFilter` keeps retrieved passages that contain one of the query's
answers out of the hard negatives: the dense index finds answer passages beyond BM25's top-k
(and ``bm25.n_positives`` keeps only the first few), and training would push them away as
negatives. They stay among the candidates, which the teacher scores.

The driver reads the queries a shard at a time (:class:`Queries`) and holds the positives and
answers in Arrow columns looked up by qid hash (:class:`Positives`, :class:`AnswerFilter`):
O(qrels) bytes in columns, where it held the query table and Python sets of every query's
positives (about 1 KB a query).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.keyindex import KeyIndex
from qgscale.data.pidfilter import key_hashes
from qgscale.data.schema import ANSWERS, CANDIDATES, QRELS, TRAIN_EXAMPLES, blank
from qgscale.errors import DataError
from qgscale.runtime import actor_resources, bundles, requesting


@dataclass(frozen=True)
class Positives:
    """The positive pids (rel > 0) of QRELS shards by qid, held in Arrow columns (about 40
    bytes a distinct (qid, pid) pair, with its qid's hash), looked up a query shard at a
    time."""

    index: KeyIndex  # distinct positive (qid, pid) pairs, by qid
    most: int  # the most positives of one query

    @classmethod
    def read(cls, qrels_uri: str) -> Positives:
        """The positives of ``qrels_uri`` (a file or a folder of shards), read file by file
        (only the positive rows are kept); a missing field, or an empty qid or pid on a
        positive row, is a DataError naming file and row."""
        parts = []
        for f in storage.parquet_files(qrels_uri):
            t = storage.read_parquet(f)
            missing = [c for c in QRELS.names if c not in t.column_names]
            if missing:
                raise DataError(f"{f}: qrels lack field(s) {missing}")
            pos = pc.fill_null(pc.greater(t.column("rel"), 0), False)
            for field in ("qid", "pid"):
                bad = pc.and_(pos, blank(t.column(field)))
                if pc.any(bad).as_py():
                    i = pc.index(bad, True).as_py()
                    raise DataError(f"{f}: row {i}: empty field {field!r} of a positive")
            parts.append(t.filter(pos).select(["qid", "pid"]))
        pairs = pa.concat_tables(parts, promote_options="permissive")
        q, p = pairs.column("qid"), pairs.column("pid")
        hq, hp = key_hashes(q), key_hashes(p)
        order = np.lexsort((hp, hq))  # by qid hash, then pid hash: a pair twice is adjacent
        hq, hp = hq[order], hp[order]
        dup = np.flatnonzero((hq[1:] == hq[:-1]) & (hp[1:] == hp[:-1])) + 1
        if len(dup):  # the same hashes: the same pair unless the strings differ
            a, b = pa.array(order[dup]), pa.array(order[dup - 1])
            same = pc.and_(pc.equal(q.take(a), q.take(b)), pc.equal(p.take(a), p.take(b)))
            dup = dup[same.to_numpy(zero_copy_only=False)]
        keep = np.ones(len(order), dtype=bool)
        keep[dup] = False
        hq = hq[keep]
        runs = np.diff(np.flatnonzero(np.r_[True, hq[1:] != hq[:-1], True]))  # per qid
        return cls(KeyIndex(pairs.take(pa.array(order[keep])), "qid", hq),
                   int(runs.max()) if len(hq) else 0)

    def of(self, qids: Sequence[str]) -> list[list[str]]:
        """Each query's positive pids, sorted (none for a query without)."""
        return [sorted(set(p)) for p in self.index.values(pa.array(qids, pa.string()), "pid")]


@dataclass(frozen=True)
class AnswerFilter:
    """The retrieved passages that contain one of their query's answers (DPR's match on
    "title text", ``qgscale.retrieval.answers``): not hard negatives. ``answers``: ANSWERS
    rows by qid (:meth:`read`)."""

    answers: KeyIndex
    corpus_uri: str
    match: str = "dpr"

    @classmethod
    def read(cls, answers_uri: str, corpus_uri: str, match: str = "dpr") -> AnswerFilter:
        """The filter of a prepared split's ``answers`` table, held in Arrow columns."""
        table = storage.read_parquet(answers_uri)
        missing = [c for c in ANSWERS.names if c not in table.column_names]
        if missing:
            raise DataError(f"{answers_uri}: missing field(s) {missing}")
        return cls(KeyIndex.build(table.select(ANSWERS.names), "qid"), corpus_uri, match)

    def hits(self, qids: Sequence[str], lists: Sequence[Sequence[str | None]]
             ) -> set[tuple[str, str]]:
        """The (qid, pid) pairs of the lists whose passage contains an answer; the corpus is
        streamed shard by shard (only the listed pids' rows are read, no text is kept)."""
        from qgscale.data.corpus import iter_passages
        from qgscale.retrieval.answers import has_answer

        answers = {q: [a for row in rows for a in row or ()] for q, rows in zip(
            qids, self.answers.values(pa.array(qids, pa.string()), "answers"), strict=True)}
        asked: dict[str, list[str]] = defaultdict(list)  # pid -> qids with answers
        for qid, row in zip(qids, lists, strict=True):
            if answers[qid]:
                for p in dict.fromkeys(p for p in row if p is not None):
                    asked[p].append(qid)
        out: set[tuple[str, str]] = set()
        seen: set[str] = set()
        for pid, body in iter_passages(self.corpus_uri, asked):
            seen.add(pid)
            out.update((q, pid) for q in asked[pid] if has_answer(answers[q], body,
                                                                  self.match))
        if len(seen) < len(asked):
            lost = sorted(set(asked) - seen)
            raise DataError(f"{self.corpus_uri}: {len(lost)} retrieved pid(s) not in the corpus "
                            f"the answers are matched on (e.g. {lost[:3]}): the index was "
                            "built from another corpus")
        return out


def select(qids: list[str], pids: np.ndarray, scores: np.ndarray,
           positives: dict[str, set[str]], top_k: int, n_negatives: int,
           skip_top: int = 0, answer_hits: set[tuple[str, str]] = frozenset()
           ) -> tuple[pa.Table, pa.Table, int, int]:
    """Retrieved lists -> (CANDIDATES, TRAIN_EXAMPLES, #queries without positive, #answer
    passages kept out of the negatives).

    Positives and missing hits are dropped first; candidates are the first ``top_k`` left,
    negatives the first ``n_negatives`` after the first ``skip_top`` that are not in
    ``answer_hits`` (:meth:`AnswerFilter.hits`).
    """
    cand = {"qid": [], "pids": [], "scores": []}
    train = {"qid": [], "pos_pids": [], "neg_pids": []}
    no_pos = dropped = 0
    for qid, row_p, row_s in zip(qids, pids, scores, strict=True):
        pos = positives.get(qid, set())
        ranked = [(p, float(s)) for p, s in zip(row_p, row_s, strict=True)
                  if p is not None and p not in pos]
        cand["qid"].append(qid)
        cand["pids"].append([p for p, _ in ranked[:top_k]])
        cand["scores"].append([s for _, s in ranked[:top_k]])
        if not pos:
            no_pos += 1
            continue
        train["qid"].append(qid)
        train["pos_pids"].append(sorted(pos))
        negs: list[str] = []
        for p, _ in ranked[skip_top:]:
            if len(negs) == n_negatives:
                break
            if (qid, p) in answer_hits:
                dropped += 1
            else:
                negs.append(p)
        train["neg_pids"].append(negs)
    return (pa.Table.from_pydict(cand, schema=CANDIDATES),
            pa.Table.from_pydict(train, schema=TRAIN_EXAMPLES), no_pos, dropped)


@dataclass(frozen=True)
class Queries:
    """The queries of parquet shards, read by global row range (each shard's footer once,
    then only the rows asked for), so that no process holds the query table."""

    files: list[str]
    counts: list[int]  # rows per file

    @classmethod
    def open(cls, queries_uri: str) -> Queries:
        """The queries of ``queries_uri`` (a file or a folder of shards); a shard without a
        ``qid`` or ``text`` field is a DataError naming it."""
        files = storage.parquet_files(queries_uri)
        metas = storage.footers(files)
        for f, m in zip(files, metas, strict=True):
            missing = [c for c in ("qid", "text") if c not in m.schema.to_arrow_schema().names]
            if missing:
                raise DataError(f"{f}: queries lack field(s) {missing}")
        return cls(files, [m.num_rows for m in metas])

    def __len__(self) -> int:
        return sum(self.counts)

    def read(self, rows: slice) -> tuple[list[str], list[str]]:
        """The (qids, texts) of global rows ``rows``; an empty qid or text is a DataError
        naming file and row."""
        qids: list[str] = []
        texts: list[str] = []
        at = 0
        for f, n in zip(self.files, self.counts, strict=True):
            lo, hi = max(rows.start - at, 0), min(rows.stop - at, n)
            at += n
            if lo >= hi:
                continue
            t = storage.read_rows(f, lo, hi, ["qid", "text"])
            for field in ("qid", "text"):
                bad = blank(t.column(field))
                if pc.any(bad).as_py():
                    i = pc.index(bad, True).as_py()
                    raise DataError(f"{f}: row {lo + i}: empty field {field!r}")
            qids += t.column("qid").to_pylist()
            texts += t.column("text").to_pylist()
        return qids, texts


def mine(queries_uri: str, positives: Positives, encode: Callable, out_uri: str,
         search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], *,
         top_k: int = 30, n_negatives: int = 8, skip_top: int = 0, shard_rows: int = 5000,
         config_hash: str = "", answers: AnswerFilter | None = None) -> dict:
    """Mine the queries of ``queries_uri`` in shards of ``shard_rows`` (resumable), each read
    when it is mined; ``encode(texts) -> float32 matrix``, ``search_fn(vectors, k) -> (pids,
    scores)``; ``answers``: keep answer passages out of the negatives (one streamed pass over
    the corpus per query shard). The driver holds the positives in columns and one query
    shard in Python, never the query table. Returns the manifest."""
    queries = Queries.open(queries_uri)
    k = max(top_k, skip_top + n_negatives) + positives.most
    cand_w = storage.ShardWriter(storage.join(out_uri, "candidates"), config_hash)
    train_w = storage.ShardWriter(storage.join(out_uri, "train"), config_hash)

    def shard(name: str, rows: slice) -> pa.Table:
        """Both outputs of one query shard: the training examples first, so that a done
        candidates shard means both are done."""
        batch, texts = queries.read(rows)
        # no queries: one empty shard, nothing to search
        pids, scores = search_fn(encode(texts), k) if batch else ([], [])
        pos = {q: set(p) for q, p in zip(batch, positives.of(batch), strict=True) if p}
        # only queries with a positive get negatives (select), so only theirs are matched
        with_pos = [i for i, q in enumerate(batch) if q in pos]
        hits = (answers.hits([batch[i] for i in with_pos], [pids[i] for i in with_pos])
                if answers and with_pos else set())
        cand, train, n, dropped = select(batch, pids, scores, pos, top_k, n_negatives,
                                         skip_top, hits)
        train_w.write(name, train, no_positive=n, answer_negatives_dropped=dropped)
        return cand

    m_cand = cand_w.write_shards(len(queries), shard_rows, shard, desc="mine")
    names = [s["name"] for s in m_cand["shards"]]
    done = train_w.markers()
    marks = [done.get(name, {}) for name in names]  # finalize names a missing one
    no_pos = sum(m.get("no_positive", 0) for m in marks)
    dropped = sum(m.get("answer_negatives_dropped", 0) for m in marks)
    m_train = train_w.finalize(names, done, no_positive=no_pos,
                               answer_negatives_dropped=dropped)
    return storage.write_manifest(out_uri, config_hash, queries=len(queries),
                                  candidates=m_cand["rows"], train_examples=m_train["rows"],
                                  no_positive=no_pos, answer_negatives_dropped=dropped,
                                  answer_filter=answers is not None)


def run_mine(cfg: Any, model_uri: str, index_uri: str, queries_uri: str, qrels_uri: str,
             out_uri: str, key: str, answers: AnswerFilter | None = None) -> dict:
    """Stage function ``index mine``: encode the queries with ``model_uri``, search
    ``index_uri``, write ``out_uri/{candidates,train}`` (``cfg.mine``, ``cfg.index.search``;
    ``answers``: see :class:`AnswerFilter`)."""
    import ray

    from qgscale.index.encode import QueryEncoder, load_dual_encoder
    from qgscale.index.search import ShardedSearcher, search_bundles

    mc, ic = cfg.mine, cfg.index.search
    res = actor_resources("index.search", 1, ic.cpus_per_actor, ic.gpus_per_actor)
    with requesting("index.search",
                    bundles(res) + search_bundles(index_uri, ic.cpus_per_actor)):
        actor = ray.remote(QueryEncoder).options(**res.options()).remote(
            functools.partial(load_dual_encoder, model_uri), ic.batch_size, ic.precision,
            res.num_gpus, res.threads)
        searcher = ShardedSearcher(index_uri, ic.nprobe, ic.ef_search, ic.cpus_per_actor,
                                   ic.refine, ic.k_factor, num_gpus=res.num_gpus,
                                   gpus_explicit=bool(ic.gpus_per_actor))
        try:
            return mine(queries_uri, Positives.read(qrels_uri),
                        lambda texts: ray.get(actor.encode_queries.remote(texts)), out_uri,
                        searcher.search, top_k=mc.top_k, n_negatives=mc.n_negatives,
                        skip_top=mc.skip_top, shard_rows=mc.shard_rows, config_hash=key,
                        answers=answers)
        finally:
            ray.kill(actor)
            searcher.close()
