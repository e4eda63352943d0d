"""Search a built index: fan out over its shards, merge top-k by score, map ids to pids.

Two fan-outs: ``faiss.IndexShards`` in this process (default), or one Ray actor per shard
(:class:`ShardSearcher`) with the top-k merged by ``faiss.ResultHeap``. Scores are
higher-is-better: inner products, or negated squared L2 distances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qgscale import storage
from qgscale.index.encode import apply_storage_env, storage_env


def set_search_params(index: Any, nprobe: int | None = None, ef_search: int | None = None):
    """Set ``nprobe`` (IVF) / ``efSearch`` (HNSW) through IDMap / PreTransform wrappers."""
    import faiss

    index = faiss.downcast_index(index)
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        faiss.extract_index_ivf(index).nprobe = nprobe
    if ef_search is not None:
        node = index
        while node is not None:
            if hasattr(node, "hnsw"):
                node.hnsw.efSearch = ef_search
                break
            inner = getattr(node, "index", None)
            node = faiss.downcast_index(inner) if inner is not None else None


def read_index_file(index_uri: str, rel: str, ondisk: bool):
    """Read one index shard; on-disk IVF shards are fetched next to their .ivfdata and mmapped."""
    import faiss

    uri = storage.join(index_uri, rel)
    if not ondisk:
        return faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), np.uint8))
    folder = storage.local_dir(storage.join(index_uri, os.path.dirname(rel)))
    return faiss.read_index(os.path.join(folder, os.path.basename(rel)),
                            faiss.IO_FLAG_ONDISK_SAME_DIR)


def read_pids(index_uri: str) -> np.ndarray:
    """The id map: ``pids[id]`` (ids are the contiguous row numbers 0..n-1)."""
    table = storage.read_parquet(storage.join(index_uri, "ids"))
    ids = table.column("id").to_numpy()
    order = np.argsort(ids)
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise ValueError(f"{index_uri}/ids: ids are not exactly 0..{len(ids) - 1}")
    return np.asarray(table.column("pid").to_pylist(), dtype=object)[order]


def _to_results(dist: np.ndarray, ids: np.ndarray, pids: np.ndarray, metric: str):
    scores = dist if metric == "ip" else -dist
    out = np.full(ids.shape, None, dtype=object)
    ok = ids >= 0
    out[ok] = pids[ids[ok]]
    return out, np.where(ok, scores, np.nan).astype(np.float32)


@dataclass
class LoadedIndex:
    """An index held in this process (one faiss index or an IndexShards over several)."""

    index: Any
    pids: np.ndarray
    metric: str
    parts: list = field(default_factory=list)  # keep shard objects alive under IndexShards

    def search(self, x: np.ndarray, k: int):
        dist, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        return _to_results(dist, ids, self.pids, self.metric)


def load_index(index_uri: str, nprobe: int | None = None,
               ef_search: int | None = None) -> LoadedIndex:
    import faiss

    m = storage.read_manifest(index_uri)
    if m is None:
        raise FileNotFoundError(f"{index_uri}: no {storage.MANIFEST}; build the index first")
    parts = [read_index_file(index_uri, rel, m.get("ondisk", False)) for rel in m["shards"]]
    for p in parts:
        set_search_params(p, nprobe, ef_search)
    if len(parts) == 1:
        index = parts[0]
    else:
        index = faiss.IndexShards(m["dim"], True, False)
        for p in parts:
            index.add_shard(p)
    return LoadedIndex(index, read_pids(index_uri), m["metric"], parts)


_CACHE: dict[tuple, LoadedIndex] = {}


def search(index_uri: str, query_vectors: np.ndarray, k: int, nprobe: int | None = None,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(pids, scores)`` for each query row; ``pids`` is an object array (None where
    fewer than k hits), ``scores`` float32 (NaN there). The loaded index is cached."""
    key = (index_uri, nprobe, ef_search)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_index(index_uri, nprobe, ef_search)
    return _CACHE[key].search(query_vectors, k)


class ShardSearcher:
    """Ray actor body: holds one index shard, returns raw ``(dist, ids)`` with global ids."""

    def __init__(self, index_uri: str, rel: str, ondisk: bool, nprobe: int | None,
                 ef_search: int | None, env: dict, threads: int = 1):
        import faiss

        apply_storage_env(env)
        faiss.omp_set_num_threads(max(1, threads))
        self.index = read_index_file(index_uri, rel, ondisk)
        set_search_params(self.index, nprobe, ef_search)

    def search(self, x: np.ndarray, k: int):
        return self.index.search(x, k)


class ShardedSearcher:
    """Fan-out search over Ray actors (one per index shard); merge with ``faiss.ResultHeap``."""

    def __init__(self, index_uri: str, nprobe: int | None = None, ef_search: int | None = None,
                 num_cpus: float = 1.0):
        import ray

        m = storage.read_manifest(index_uri)
        if m is None:
            raise FileNotFoundError(f"{index_uri}: no {storage.MANIFEST}")
        self.metric = m["metric"]
        actor = ray.remote(num_cpus=num_cpus)(ShardSearcher)
        self.actors = [actor.remote(index_uri, rel, m.get("ondisk", False), nprobe, ef_search,
                                    storage_env(), max(1, int(num_cpus)))
                       for rel in m["shards"]]
        self.pids = read_pids(index_uri)

    def search(self, x: np.ndarray, k: int):
        import faiss
        import ray

        x = np.ascontiguousarray(x, dtype=np.float32)
        ref = ray.put(x)
        heap = faiss.ResultHeap(len(x), k, keep_max=self.metric == "ip")
        for dist, ids in ray.get([a.search.remote(ref, k) for a in self.actors]):
            heap.add_result(dist, ids)
        heap.finalize()
        return _to_results(heap.D, heap.I, self.pids, self.metric)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
