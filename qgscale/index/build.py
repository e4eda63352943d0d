"""Distributed FAISS build over embedding shards (the autofaiss recipe on Ray).

1. sample training vectors across shards: each shard sends its ``ceil(k * n_i / n * 1.05)``
   rows with the smallest random keys (float16), the training task keeps the ``k`` smallest
   keys overall: it receives about ``1.05 k`` rows whatever the corpus size;
2. train the index from a factory string (GPU clustering with faiss-gpu when present) and
   save the trained empty index to storage;
3. add each embedding shard on a pool of Ray actors (:func:`qgscale.runtime.run_shards`;
   global int64 id = row offset of the shard + row), writing an index part and its id map
   ``{id, pid}`` (done marker last);
4. merge the IVF parts into ``num_shards`` indexes (``faiss.merge_into`` in memory, or
   ``faiss.contrib.ondisk.merge_ondisk``), or keep them as parts for sharded search.

Layout under ``index_uri``::

    trained.faiss  trained.json       trained empty index
    parts/part-00000.faiss            one index part per embedding shard (or group)
    ids/part-00000.parquet            its id map {id, pid}; ids/_done/ = done markers
    shards/shard-00000.faiss          final index shard(s) (+ .ivfdata when on disk)
    _manifest.json                    factory, metric, dim, ntotal, shard files, timings
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgscale import storage
from qgscale.config import BuildConfig, key_values
from qgscale.index.encode import read_vectors
from qgscale.runtime import (
    Shard,
    actor_resources,
    bundles,
    connect,
    remote_options,
    requesting,
    run_shards,
)

IDS_SCHEMA = pa.schema([("id", pa.int64()), ("pid", pa.string())])


# ---------------------------------------------------------------- factory and estimates
def metric_type(metric: str) -> int:
    import faiss

    if metric not in ("ip", "l2"):
        raise ValueError(f"index.build.metric: expected 'ip' or 'l2', got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def is_ivf(factory: str) -> bool:
    return "IVF" in factory


def with_ids(factory: str) -> str:
    """Non-IVF indexes need an IDMap2 wrapper to hold our global ids."""
    return factory if is_ivf(factory) or factory.startswith("IDMap") else f"IDMap2,{factory}"


def bytes_per_vector(factory: str, dim: int) -> float:
    """Rough memory per indexed vector (codes + 8-byte id), as autofaiss estimates it."""
    import re

    pq_m = re.search(r"PQ(\d+)(?:x(\d+))?", factory)
    if pq_m:
        code = int(pq_m.group(1)) * int(pq_m.group(2) or 8) / 8
    elif "SQ8" in factory:
        code = dim
    else:
        code = 4 * dim
    hnsw = re.search(r"HNSW(\d+)", factory)
    graph = 2 * int(hnsw.group(1)) * 4 if hnsw and not is_ivf(factory) else 0
    return code + graph + 8


def estimate(factory: str, n: int, dim: int) -> dict:
    import re

    nlist_m = re.search(r"IVF(\d+)", factory)
    nlist = int(nlist_m.group(1)) if nlist_m else 0
    index_bytes = n * bytes_per_vector(factory, dim) + nlist * dim * 4
    return {"factory": factory, "n_vectors": n, "dim": dim, "nlist": nlist,
            "index_gb": index_bytes / 2**30,
            "min_train_samples": 39 * nlist if nlist else 0}


def auto_factory(n: int, dim: int, max_memory_gb: float) -> str:
    """Pick a factory like autofaiss: exact for small corpora, IVF-Flat if it fits in half the
    memory budget, else IVF-PQ with the largest code that fits; nlist ~ 4 sqrt(n)."""
    budget = max_memory_gb * 2**30
    if n <= 100_000 and n * (4 * dim + 8) <= 0.5 * budget:
        return "Flat"
    nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(n))))
    while nlist > 16 and 39 * nlist > n:
        nlist //= 2
    if n <= 2_000_000 and n * (4 * dim + 8) <= 0.5 * budget:
        return f"IVF{nlist},Flat"
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m == 0 and n * (m + 8) <= 0.8 * budget:
            return f"IVF{nlist},PQ{m}"
    raise ValueError(f"{n} vectors of dim {dim} do not fit index.max_memory_gb={max_memory_gb}")


@contextlib.contextmanager
def phase(timings: dict, name: str) -> Iterator[None]:
    start = time.time()
    yield
    timings[name] = round(time.time() - start, 3)


# ---------------------------------------------------------------- Ray tasks and actors
def _limit_threads(num_cpus: float) -> None:
    """Use exactly this task's CPU share: faiss/OpenBLAS (OpenMP) and Arrow decode threads."""
    import faiss

    threads = max(1, int(num_cpus))
    faiss.omp_set_num_threads(threads)
    pa.set_cpu_count(threads)


def sample_shard(uri: str, quota: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``quota`` rows of one shard with the smallest uniform random keys: ``(keys,
    vectors)``, the vectors in float16 (half the memory until training)."""
    _, vecs = read_vectors(uri)
    keys = np.random.default_rng(seed).random(len(vecs))
    keep = np.argsort(keys)[:quota]
    return keys[keep], vecs[keep].astype(np.float16)


def sample_quotas(counts: list[int], k: int, slack: float = 1.05) -> list[int]:
    """Rows each shard sends for a training sample of ``k``: ``ceil(k * n_i / n * slack)``
    (at most ``n_i``), so the training task receives about ``slack * k`` rows, whatever N."""
    n = sum(counts)
    return [min(c, math.ceil(k * c / n * slack)) if n else 0 for c in counts]


def train_index(factory: str, metric: str, dim: int, out_uri: str,
                *samples: tuple[np.ndarray, np.ndarray], k: int = 0, threads: int = 1) -> dict:
    """Train ``factory`` on the ``k`` lowest-key sampled rows (``threads``: this task's CPU
    share); write the empty index."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    index = faiss.index_factory(dim, with_ids(factory), metric_type(metric))
    n_train = n_received = 0
    if not index.is_trained:
        keys = np.concatenate([s[0] for s in samples])
        n_received = len(keys)
        top = np.argsort(keys)[:k]
        x = np.ascontiguousarray(np.concatenate([s[1] for s in samples])[top],
                                 dtype=np.float32)
        n_train = len(x)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus():
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        index.train(x)
    storage.write_bytes(out_uri, faiss.serialize_index(index).tobytes())
    return {"n_train": n_train, "n_received": n_received}


@dataclass
class AddJob:
    """The shard job of the add step. Per group of embedding shards (the shard payload:
    ``(uris, offsets)``): a copy of the trained index with their vectors under global ids,
    written as ``parts/<name>.faiss``; the shard itself is its id map ``{id, pid}`` under
    ``ids/`` (written with its done marker after the part)."""

    trained_uri: str
    index_uri: str

    def setup(self, device: str, threads: int) -> bytes:
        _limit_threads(threads)
        return storage.read_bytes(self.trained_uri)

    def run(self, trained: bytes, shard: Shard) -> pa.Table:
        import faiss

        index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
        all_ids, all_pids = [], []
        for uri, offset in zip(*shard.payload, strict=True):
            pids, vecs = read_vectors(uri)
            ids = np.arange(offset, offset + len(pids), dtype=np.int64)
            index.add_with_ids(vecs, ids)
            all_ids.append(ids)
            all_pids.extend(pids)
        storage.write_bytes(storage.join(self.index_uri, "parts", f"{shard.name}.faiss"),
                            faiss.serialize_index(index).tobytes())
        return pa.table({"id": np.concatenate(all_ids), "pid": all_pids}, schema=IDS_SCHEMA)


def _read_index(uri: str, mmap_ok: bool = False):
    import faiss

    return faiss.deserialize_index(np.frombuffer(storage.read_bytes(uri), np.uint8))


def merge_parts(trained_uri: str, part_uris: list[str], out_uri: str, mode: str,
                num_cpus: float) -> int:
    """Merge index parts into one index at ``out_uri`` (inverted-list merge)."""
    import faiss

    _limit_threads(num_cpus)
    if mode == "ondisk":
        from faiss.contrib.ondisk import merge_ondisk

        with tempfile.TemporaryDirectory() as tmp:
            local = []
            for i, uri in enumerate(part_uris):
                local.append(os.path.join(tmp, f"part-{i}.faiss"))
                with open(local[-1], "wb") as f:
                    f.write(storage.read_bytes(uri))
            index = _read_index(trained_uri)
            base = posixpath.basename(out_uri)
            merge_ondisk(index, local, os.path.join(tmp, base + ".ivfdata"))
            faiss.write_index(index, os.path.join(tmp, base))
            ntotal = index.ntotal
            del index
            for suffix in (".ivfdata", ""):
                with open(os.path.join(tmp, base + suffix), "rb") as f:
                    storage.write_bytes(out_uri + suffix, f.read())
        return ntotal
    index = _read_index(trained_uri)
    for uri in part_uris:
        part = _read_index(uri)
        if faiss.try_extract_index_ivf(index) is not None:
            faiss.merge_into(index, part, False)
        else:
            index.merge_from(part, 0)
    storage.write_bytes(out_uri, faiss.serialize_index(index).tobytes())
    return index.ntotal


# ---------------------------------------------------------------- driver
def shard_rows(uris: list[str]) -> tuple[list[int], int]:
    """Row count of every embedding shard and the vector dimension (parquet footers only)."""
    counts, dim = [], 0
    for uri in uris:
        fs, path = storage.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            counts.append(meta.metadata.num_rows)
            if not dim:
                vec = meta.schema_arrow.field("vector").type
                if not pa.types.is_fixed_size_list(vec):
                    raise ValueError(f"{uri}: field 'vector' must be a fixed-size list")
                dim = vec.list_size
    return counts, dim


def _groups(n: int, k: int) -> list[list[int]]:
    k = max(1, min(k, n))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def build_index(emb_uri: str, index_uri: str, bc: BuildConfig | None = None,
                config_hash: str = "", seed: int = 0) -> dict:
    """Build (or resume building) the index of every embedding shard under ``emb_uri``
    (settings ``bc``, the ``index.build`` section; defaults if None; ``seed``: the training
    sample)."""
    import ray

    bc = bc or BuildConfig()
    connect()
    chash = config_hash or storage.config_hash(
        {"emb": emb_uri, "seed": seed, **key_values(bc)})
    uris = storage.list_files(emb_uri, ".parquet")
    if not uris:
        raise FileNotFoundError(f"{emb_uri}: no embedding shards")
    counts, dim = shard_rows(uris)
    n = int(sum(counts))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    factory = bc.factory
    if factory == "auto":
        factory = auto_factory(n, dim, bc.max_memory_gb)
    if "RFlat" in factory or "Refine(" in factory:
        raise ValueError(f"index.build.factory={factory!r}: the distributed build does not "
                         "take a refine suffix; set index.search.refine / k_factor (search-time "
                         "re-ranking with the embedding shards) instead")
    est = estimate(factory, n, dim)
    print(f"[index build] {n} vectors x {dim} -> {factory}: ~{est['index_gb']:.2f} GiB index, "
          f"nlist={est['nlist']}, train samples={min(bc.train_samples, n)} "
          f"(min {est['min_train_samples']})", flush=True)
    timings: dict[str, Any] = {}
    task_options = remote_options(bc.cpus_per_actor, max_retries=bc.max_retries)

    trained_uri = storage.join(index_uri, "trained.faiss")
    info_uri = storage.join(index_uri, "trained.json")
    with phase(timings, "train_s"):
        trained_ok = storage.exists(info_uri) and storage.read_json(info_uri)["hash"] == chash
        if not trained_ok:
            import faiss

            needs_training = not faiss.index_factory(dim, with_ids(factory),
                                                     metric_type(bc.metric)).is_trained
            k = min(bc.train_samples, n) if needs_training else 0
            sample = ray.remote(sample_shard).options(**task_options)
            samples = [sample.remote(u, q, seed * 100_003 + i) for i, (u, q) in
                       enumerate(zip(uris, sample_quotas(counts, k), strict=True)) if q] \
                if k else []
            res = actor_resources("index.build", 1, bc.cpus_per_actor, bc.gpus_per_actor)
            train = ray.remote(train_index).options(**res.options())
            with requesting("index.build", bundles(res)):
                info = ray.get(train.remote(factory, bc.metric, dim, trained_uri, *samples,
                                            k=k, threads=res.threads))
            storage.write_json(info_uri, {"hash": chash, "factory": factory, **info})

    mergeable = is_ivf(factory) or bc.num_shards == 0 or "HNSW" not in factory
    part_groups = ([[i] for i in range(len(uris))] if mergeable
                   else _groups(len(uris), max(1, bc.num_shards)))
    names = [f"part-{g[0]:05d}" for g in part_groups]
    ids_uri = storage.join(index_uri, "ids")
    with phase(timings, "add_s"):
        shards = [Shard(name, 1, ([uris[i] for i in g], [offsets[i] for i in g]))
                  for name, g in zip(names, part_groups, strict=True)]
        add_stats = run_shards(AddJob(trained_uri, index_uri), shards, ids_uri, chash,
                               bc.model_copy(update={"gpus_per_actor": 0}),
                               stage="index.build", desc="index add")
    storage.ShardWriter(ids_uri, chash).finalize(names, run=add_stats)

    part_uris = [storage.join(index_uri, "parts", f"{nm}.faiss") for nm in names]
    with phase(timings, "merge_s"):
        if bc.num_shards == 0 or not mergeable or bc.num_shards >= len(names):
            shard_files = [posixpath.join("parts", f"{nm}.faiss") for nm in names]
            ondisk = False
        else:
            groups = _groups(len(names), bc.num_shards)
            shard_files = [f"shards/shard-{j:05d}.faiss" for j in range(len(groups))]
            ondisk = bc.merge == "ondisk" and is_ivf(factory)
            merge = ray.remote(merge_parts).options(**task_options)
            merged = ray.get([merge.remote(trained_uri, [part_uris[i] for i in g],
                                           storage.join(index_uri, f),
                                           "ondisk" if ondisk else "memory", bc.cpus_per_actor)
                              for f, g in zip(shard_files, groups, strict=True)])
            if sum(merged) != n:
                raise RuntimeError(f"{index_uri}: merged {sum(merged)} != {n} vectors")
    rates = {f"{p[:-2]}_vectors_per_s": round(n / max(timings[p], 1e-9), 1)
             for p in ("add_s", "merge_s")}
    return storage.write_manifest(index_uri, chash, factory=factory, metric=bc.metric,
                                  dim=dim, ntotal=n, shards=shard_files, ondisk=ondisk,
                                  estimate=est, timings=timings | rates, embeddings=emb_uri)


def run_build(cfg, emb_uri: str, index_uri: str, key: str) -> dict:
    """Stage function ``index build``: embedding shards at ``emb_uri`` -> the FAISS index at
    ``index_uri`` (``cfg.index.build``)."""
    return build_index(emb_uri, index_uri, cfg.index.build, key, cfg.run.seed)
