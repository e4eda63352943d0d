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
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from qgscale import storage
from qgscale.data.schema import CANDIDATES, QRELS, QUERIES, TRAIN_EXAMPLES
from qgscale.errors import DataError
from qgscale.runtime import actor_resources, bundles, requesting


def read_positives(qrels_uri: str) -> dict[str, set[str]]:
    """qid -> positive pids (rel > 0) from QRELS shards."""
    table = storage.read_parquet(qrels_uri)
    missing = [c for c in QRELS.names if c not in table.column_names]
    if missing:
        raise ValueError(f"{qrels_uri}: qrels lack field(s) {missing}")
    pos: dict[str, set[str]] = defaultdict(set)
    for qid, pid, rel in zip(*(table.column(c).to_pylist() for c in QRELS.names), strict=True):
        if rel is not None and rel > 0:
            pos[qid].add(pid)
    return pos


@dataclass(frozen=True)
class AnswerFilter:
    """The retrieved passages that contain one of their query's answers (DPR's match on
    "title text", ``qgscale.retrieval.answers``): not hard negatives."""

    answers: Mapping[str, Sequence[str]]
    corpus_uri: str
    match: str = "dpr"

    def hits(self, qids: Sequence[str], lists: Sequence[Sequence[str | None]]
             ) -> set[tuple[str, str]]:
        """The (qid, pid) pairs of the lists whose passage contains an answer; the corpus is
        streamed shard by shard (only the listed pids' rows are read, no text is kept)."""
        from qgscale.data.corpus import iter_passages
        from qgscale.retrieval.answers import has_answer

        asked: dict[str, list[str]] = defaultdict(list)  # pid -> qids with answers
        for qid, row in zip(qids, lists, strict=True):
            if self.answers.get(qid):
                for p in dict.fromkeys(p for p in row if p is not None):
                    asked[p].append(qid)
        out: set[tuple[str, str]] = set()
        seen: set[str] = set()
        for pid, body in iter_passages(self.corpus_uri, asked):
            seen.add(pid)
            out.update((q, pid) for q in asked[pid] if has_answer(self.answers[q], body,
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


def mine(queries: pa.Table, positives: dict[str, set[str]], encode: Callable, out_uri: str,
         search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], *,
         top_k: int = 30, n_negatives: int = 8, skip_top: int = 0, shard_rows: int = 5000,
         config_hash: str = "", answers: AnswerFilter | None = None) -> dict:
    """Mine query shards of ``shard_rows`` (resumable); ``encode(texts) -> float32 matrix``,
    ``search_fn(vectors, k) -> (pids, scores)``; ``answers``: keep answer passages out of the
    negatives (one streamed pass over the corpus per query shard). Returns the manifest."""
    for c in QUERIES.names:
        if c not in queries.column_names:
            raise ValueError(f"queries lack field {c!r}")
    qids, texts = queries.column("qid").to_pylist(), queries.column("text").to_pylist()
    extra = max((len(positives.get(q, ())) for q in qids), default=0)
    k = max(top_k, skip_top + n_negatives) + extra
    cand_w = storage.ShardWriter(storage.join(out_uri, "candidates"), config_hash)
    train_w = storage.ShardWriter(storage.join(out_uri, "train"), config_hash)

    def shard(name: str, rows: slice) -> pa.Table:
        """Both outputs of one query shard: the training examples first, so that a done
        candidates shard means both are done."""
        # no queries: one empty shard, nothing to search
        pids, scores = search_fn(encode(texts[rows]), k) if rows.stop > rows.start else ([], [])
        batch = qids[rows]
        # only queries with a positive get negatives (select), so only theirs are matched
        with_pos = [i for i, q in enumerate(batch) if q in positives]
        hits = (answers.hits([batch[i] for i in with_pos], [pids[i] for i in with_pos])
                if answers and with_pos else set())
        cand, train, n, dropped = select(batch, pids, scores, positives, top_k, n_negatives,
                                         skip_top, hits)
        train_w.write(name, train, no_positive=n, answer_negatives_dropped=dropped)
        return cand

    m_cand = cand_w.write_shards(len(qids), shard_rows, shard, desc="mine")
    names = [s["name"] for s in m_cand["shards"]]
    done = train_w.markers()
    marks = [done.get(name, {}) for name in names]  # finalize names a missing one
    no_pos = sum(m.get("no_positive", 0) for m in marks)
    dropped = sum(m.get("answer_negatives_dropped", 0) for m in marks)
    m_train = train_w.finalize(names, done, no_positive=no_pos,
                               answer_negatives_dropped=dropped)
    return storage.write_manifest(out_uri, config_hash, queries=len(qids),
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
            return mine(storage.read_parquet(queries_uri), read_positives(qrels_uri),
                        lambda texts: ray.get(actor.encode_queries.remote(texts)), out_uri,
                        searcher.search, top_k=mc.top_k, n_negatives=mc.n_negatives,
                        skip_top=mc.skip_top, shard_rows=mc.shard_rows, config_hash=key,
                        answers=answers)
        finally:
            ray.kill(actor)
            searcher.close()
