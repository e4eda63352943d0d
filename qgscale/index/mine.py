"""Candidate and hard-negative mining: top-k retrieval for training queries, positives dropped.

Outputs under ``out_uri``:
``candidates/`` CANDIDATES ``{qid, pids, scores}`` (top-k, positives removed; the teacher
scores these) and ``train/`` TRAIN_EXAMPLES ``{qid, pos_pids, neg_pids}`` (hard negatives =
candidates ranked ``skip_top .. skip_top + n_negatives``; queries without a positive get
candidates but no training example, and are counted in the manifest).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from qgscale import storage
from qgscale.data.schema import CANDIDATES, QRELS, QUERIES, TRAIN_EXAMPLES
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


def select(qids: list[str], pids: np.ndarray, scores: np.ndarray,
           positives: dict[str, set[str]], top_k: int, n_negatives: int,
           skip_top: int = 0) -> tuple[pa.Table, pa.Table, int]:
    """Retrieved lists -> (CANDIDATES, TRAIN_EXAMPLES, #queries without positive).

    Positives and missing hits are dropped first; candidates are the first ``top_k`` left,
    negatives the ``n_negatives`` after the first ``skip_top``.
    """
    cand = {"qid": [], "pids": [], "scores": []}
    train = {"qid": [], "pos_pids": [], "neg_pids": []}
    no_pos = 0
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
        train["neg_pids"].append([p for p, _ in ranked[skip_top:skip_top + n_negatives]])
    return (pa.Table.from_pydict(cand, schema=CANDIDATES),
            pa.Table.from_pydict(train, schema=TRAIN_EXAMPLES), no_pos)


def mine(queries: pa.Table, positives: dict[str, set[str]], encode: Callable, out_uri: str,
         search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], *,
         top_k: int = 30, n_negatives: int = 8, skip_top: int = 0, shard_rows: int = 5000,
         config_hash: str = "") -> dict:
    """Mine query shards of ``shard_rows`` (resumable); ``encode(texts) -> float32 matrix``,
    ``search_fn(vectors, k) -> (pids, scores)``. Returns the stage manifest."""
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
        cand, train, n = select(qids[rows], pids, scores, positives, top_k, n_negatives,
                                skip_top)
        train_w.write(name, train, no_positive=n)
        return cand

    m_cand = cand_w.write_shards(len(qids), shard_rows, shard, desc="mine")
    names = [s["name"] for s in m_cand["shards"]]
    no_pos = sum(storage.read_json(storage.join(out_uri, "train", storage.DONE_DIR,
                                                f"{name}.json")).get("no_positive", 0)
                 for name in names)
    m_train = train_w.finalize(names, no_positive=no_pos)
    return storage.write_manifest(out_uri, config_hash, queries=len(qids),
                                  candidates=m_cand["rows"], train_examples=m_train["rows"],
                                  no_positive=no_pos)


def run_mine(cfg: Any, model_uri: str, index_uri: str, queries_uri: str, qrels_uri: str,
             out_uri: str, key: str) -> dict:
    """Stage function ``index mine``: encode the queries with ``model_uri``, search
    ``index_uri``, write ``out_uri/{candidates,train}`` (``cfg.mine``, ``cfg.index.search``)."""
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
                        skip_top=mc.skip_top, shard_rows=mc.shard_rows, config_hash=key)
        finally:
            ray.kill(actor)
            searcher.close()
