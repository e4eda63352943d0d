"""Distributed FAISS build over embedding shards (the autofaiss recipe on Ray).

1. sample training vectors across shards: each shard sends its ``ceil(k * n_i / n * 1.05)``
   rows with the smallest random keys (float16), the training task keeps the ``k`` smallest
   keys overall: it receives about ``1.05 k`` rows whatever the corpus size;
2. train the index from a factory string (GPU clustering with faiss-gpu when present) and
   save the trained empty index to storage;
3. add each embedding shard on a pool of Ray actors (:func:`qgscale.runtime.run_shards`;
   global int64 id = row offset of the shard + row), writing an index part (IVF: only its
   inverted lists, the coarse quantizer emptied) and its id map ``{id, pid}`` (done marker
   last);
4. merge the parts into ``num_shards`` indexes, one Ray task per output shard (inverted
   lists appended to the trained index in memory, or ``faiss.contrib.ondisk.merge_ondisk``
   over mmapped parts), or keep them as parts for sharded search (the trained quantizer is
   restored at load). Index files go through local files, streamed to storage.

Layout under ``index_uri``::

    trained.faiss  trained.json       trained empty index
    parts/part-00000.faiss            one index part per embedding shard (or group)
    ids/part-00000.parquet            its id map {id, pid, lang}; ids/_done/ = done markers
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
from qgscale.index.vectors import iter_batches, to_float32
from qgscale.runtime import (
    Shard,
    actor_resources,
    bundles,
    connect,
    map_shards,
    remote_options,
    requesting,
    run_shards,
)

IDS_SCHEMA = pa.schema([("id", pa.int64()), ("pid", pa.string()), ("lang", pa.string())])


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
    elif "fp16" in factory or "bf16" in factory:
        code = 2 * dim
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


def memory_plan(factory: str, n: int, dim: int, num_shards: int = 1, nodes: int = 1,
                train_samples: int = 100_000, shard_rows: int = 100_000, gpu: bool = False,
                refine: str = "none", pid_bytes: int = 32) -> dict:
    """Memory (GiB) of each stage's processes for ``n`` vectors of ``dim`` in ``num_shards``
    index shards spread over ``nodes`` nodes (``shard_rows``: rows of one embedding shard;
    ``pid_bytes``: one id-map entry in a search actor: int64 id, Arrow offset, ~16-byte pid).
    ``gpu``: search on GPUs (a Flat shard is held in fp16 there); ``refine``: every search
    actor also holds its shard's exact vectors (4 or 2 bytes a dimension). Measured constants
    (benchmarks/index_build.py) add the process baseline, ~0.2-0.45 GiB per Ray worker, on
    top."""
    gib = 2**30
    est = estimate(factory, n, dim)
    shards = max(1, num_shards)
    quantizer = est["nlist"] * dim * 4
    index_shard = (est["index_gb"] * gib - quantizer) / shards + quantizer
    gpu_shard = (n / shards * (2 * dim if factory in ("Flat", "IDMap2,Flat") else
                               bytes_per_vector(factory, dim) - 8) + quantizer) if gpu else 0
    trains = any(t in factory for t in ("IVF", "PQ", "SQ4", "SQ6", "SQ8"))
    train = (min(train_samples, n) * dim * (1.05 * 2 + 4) + quantizer  # fp16 sample + fp32
             if trains else 0)
    add = shard_rows * dim * 4 * 2 + shard_rows * bytes_per_vector(factory, dim) + quantizer
    refine_shard = {"none": 0, "flat": 4, "fp16": 2}[refine] * n / shards * dim
    search_host = index_shard + n / shards * pid_bytes + refine_shard
    per_node = math.ceil(shards / max(1, nodes))
    return {"factory": factory, "n_vectors": n, "dim": dim, "num_shards": shards,
            "nodes": nodes, "index_gb": round(est["index_gb"], 3),
            "index_shard_gb": round(index_shard / gib, 3),
            "train_task_gb": round(train / gib, 3), "add_task_gb": round(add / gib, 3),
            "merge_task_gb": round(index_shard / gib, 3),
            "search_actor_host_gb": round(search_host / gib, 3),
            "search_actor_gpu_gb": round(gpu_shard / gib, 3),
            "search_actor_refine_gb": round(refine_shard / gib, 3),
            "search_per_node_host_gb": round(per_node * search_host / gib, 3),
            "search_per_node_gpu_gb": round(per_node * gpu_shard / gib, 3)}


def format_plan(plan: dict) -> str:
    """One log line of :func:`memory_plan`."""
    gpu = (f", GPU {plan['search_actor_gpu_gb']:.2f} per shard"
           if plan["search_actor_gpu_gb"] else "")
    return (f"[index build] memory plan ({plan['factory']}, {plan['n_vectors']} x "
            f"{plan['dim']}, {plan['num_shards']} shard(s) on {plan['nodes']} node(s)), GiB: "
            f"index {plan['index_gb']:.2f}, per shard {plan['index_shard_gb']:.2f}; train task "
            f"{plan['train_task_gb']:.2f}, add task {plan['add_task_gb']:.2f}, merge task "
            f"{plan['merge_task_gb']:.2f}; search actor {plan['search_actor_host_gb']:.2f} "
            f"host{gpu}; per node {plan['search_per_node_host_gb']:.2f} host"
            + (f" + {plan['search_per_node_gpu_gb']:.2f} GPU" if gpu else "")
            + (f" (with refine vectors {plan['search_actor_refine_gb']:.2f} per shard)"
               if plan["search_actor_refine_gb"] else ""))


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
    vectors)``, the vectors in float16 (half the memory until training). Streams the shard
    by record batches: memory O(quota x dim), not O(shard)."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        keys = np.random.default_rng(seed).random(pf.metadata.num_rows)
        rows = np.sort(np.argsort(keys)[:quota])
        out, start = [], 0
        for batch in pf.iter_batches(batch_size=16_384, columns=["vector"]):
            lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
            if hi > lo:
                col = batch.column(0)
                flat = col.flatten().to_numpy(zero_copy_only=False)
                out.append(flat.reshape(-1, col.type.list_size)[rows[lo:hi] - start]
                           .astype(np.float16))
            start += batch.num_rows
    dim = pf.schema_arrow.field("vector").type.list_size
    return keys[rows], (np.concatenate(out) if out else np.empty((0, dim), np.float16))


def sample_quotas(counts: list[int], k: int, seed: int = 0, slack: float = 1.05) -> list[int]:
    """Rows each shard sends for a training sample of ``k``: ``x_i = k * n_i / n * slack``
    rounded down or up by systematic sampling (one seeded offset), so the quotas sum to
    ``slack * k`` rounded down or up (less only where a quota is cut to its shard's rows)
    whatever N and however many shards: with more shards than rows to draw, most send none
    (and start no task), each with a probability by its size."""
    n = sum(counts)
    if not n:
        return [0] * len(counts)
    cum = np.cumsum([k * c / n * slack for c in counts])
    u = np.random.default_rng(seed).random()
    ends = np.floor(cum - u).astype(np.int64)
    starts = np.concatenate([[np.floor(-u)], ends[:-1]]).astype(np.int64)
    return [min(c, int(q)) for c, q in zip(counts, ends - starts, strict=True)]


def train_index(factory: str, metric: str, dim: int, out_uri: str,
                *samples: tuple[np.ndarray, np.ndarray], k: int = 0, threads: int = 1,
                gpus: float = 0.0, gpus_explicit: bool = False) -> dict:
    """Train ``factory`` on the ``k`` lowest-key sampled rows (``threads``: this task's CPU
    share; ``gpus``: its GPUs, used for the k-means when faiss has GPU support, required when
    ``gpus_explicit``); write the empty index."""
    import faiss

    from qgscale.index.gpu import use_gpu

    on_gpu = use_gpu("index.build", gpus, gpus_explicit)
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
        if ivf is not None and on_gpu:
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        index.train(x)
    write_index(index, out_uri)
    return {"n_train": n_train, "n_received": n_received}


@dataclass
class AddJob:
    """The shard job of the add step. Per group of embedding shards (the shard payload:
    ``(uris, offsets)``): a copy of the trained index with their vectors under global ids,
    written as ``parts/<name>.faiss``; the shard itself is its id map ``{id, pid, lang}``
    under ``ids/`` (written with its done marker after the part; ``lang`` only when every
    embedding shard of the group has it). Its ids are the contiguous range that follows the
    earlier groups' (what ``qgscale.index.search.id_files`` reads back)."""

    trained_uri: str
    index_uri: str

    def setup(self, device: str, threads: int) -> tuple[bytes, bool]:
        from qgscale.index.gpu import use_gpu

        on_gpu = use_gpu("index.build", 1.0 if device == "cuda" else 0.0, explicit=True)
        _limit_threads(threads)
        return storage.read_bytes(self.trained_uri), on_gpu

    def run(self, state: tuple[bytes, bool], shard: Shard) -> pa.Table:
        import faiss

        from qgscale.index.gpu import fp16_for_add, to_cpu, to_gpu

        trained, on_gpu = state
        index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
        if on_gpu:
            index = to_gpu(index, fp16=fp16_for_add(index))
        all_ids, all_pids, all_langs = [], [], []
        for uri, offset in zip(*shard.payload, strict=True):
            for batch in iter_batches(uri):  # one block at a time
                vecs = to_float32(batch.column("vector"))
                ids = np.arange(offset, offset + len(vecs), dtype=np.int64)
                index.add_with_ids(vecs, ids)
                all_ids.append(ids)
                all_pids.append(batch.column("pid").cast(pa.string()))
                if "lang" in batch.schema.names:
                    all_langs.append(batch.column("lang").cast(pa.string()))
                offset += len(vecs)
                del vecs
        if on_gpu:
            index = to_cpu(index)
        strip_quantizer(index)
        write_index(index, storage.join(self.index_uri, "parts", f"{shard.name}.faiss"))
        out = {"id": np.concatenate(all_ids), "pid": pa.chunked_array(all_pids, pa.string())}
        if len(all_langs) == len(all_pids):  # every block: the id map carries languages
            out["lang"] = pa.chunked_array(all_langs, pa.string())
        return pa.table(out, schema=pa.schema([IDS_SCHEMA.field(c) for c in out]))


def strip_quantizer(index: Any) -> None:
    """Empty the coarse quantizer of an IVF index part before writing it: every part shares
    the trained one (``trained.faiss``), restored by :func:`restore_quantizer` / merged into
    the trained index, so a part holds only its inverted lists (saves ``nlist * dim * 4``
    bytes per part: 50 MB at 16384 x 768)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.quantizer.reset()


def has_quantizer(index: Any) -> bool:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return ivf is None or ivf.quantizer.ntotal > 0


def restore_quantizer(part: Any, trained: Any) -> Any:
    """The trained index holding the inverted lists of ``part`` (an IVF part written by
    :func:`strip_quantizer`), ready to search; ``part`` is left empty."""
    import faiss

    t_ivf, p_ivf = faiss.extract_index_ivf(trained), faiss.extract_index_ivf(part)
    if t_ivf.ntotal:
        raise ValueError("restore_quantizer: the trained index must be empty")
    t_ivf.replace_invlists(p_ivf.invlists, True)
    p_ivf.own_invlists = False
    t_ivf.ntotal = trained.ntotal = p_ivf.ntotal
    return trained


def write_index(index: Any, uri: str) -> None:
    """``faiss.write_index`` to a local file, streamed to ``uri`` (no in-memory copy)."""
    import faiss

    with storage.writing_file(uri) as local:
        faiss.write_index(index, local)


def read_index(uri: str, flags: int = 0) -> Any:
    """Read an index file (streamed to a temp file first when remote)."""
    import faiss

    with storage.reading_file(uri) as local:
        return faiss.read_index(local, flags)


PART_READ_AHEAD = 4  # remote index parts a merge task downloads ahead of the one it merges


@contextlib.contextmanager
def local_parts(uris: list[str], tmp: str, ahead: int = PART_READ_AHEAD, keep: bool = False
                ) -> Iterator[Iterator[str]]:
    """Local paths of ``uris``, in order: a local file is itself; a remote one is downloaded
    into ``tmp`` by a thread pool ``ahead`` files ahead of the one being used, so a merge
    task does not wait for each part's download in turn (S3: one stream per part), and
    removed once the caller asks for the next one unless ``keep`` (then ``tmp``'s owner
    removes it). Disk: at most ``ahead + 1`` parts, or all with ``keep``."""
    from concurrent.futures import ThreadPoolExecutor

    def get(i: int, uri: str) -> str:
        dest = os.path.join(tmp, f"{i:06d}-{posixpath.basename(uri)}")
        storage.get_file(uri, dest)
        return dest

    pool = ThreadPoolExecutor(min(max(1, ahead), 8), thread_name_prefix="qgs-part")

    def paths() -> Iterator[str]:
        pending: dict[int, Any] = {}
        for i, uri in enumerate(uris):
            if storage.is_local(uri):
                yield storage.url_to_fs(uri)[1]
                continue
            for j in range(i, min(len(uris), i + ahead + 1)):
                if j not in pending and not storage.is_local(uris[j]):
                    pending[j] = pool.submit(get, j, uris[j])
            path = pending.pop(i).result()
            yield path
            if not keep:
                os.remove(path)

    try:
        yield paths()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def merge_parts(trained_uri: str, part_uris: list[str], out_uri: str, mode: str,
                num_cpus: float) -> int:
    """Merge index parts into one index at ``out_uri``: their inverted lists appended to
    those of the trained index, one part in memory at a time (``memory``), or streamed through
    mmapped parts into an ``OnDiskInvertedLists`` file (``ondisk``,
    ``faiss.contrib.ondisk.merge_ondisk``: ``out_uri`` + ``.ivfdata``); the result is
    streamed to storage from a local file. Remote parts are downloaded ahead of the merge
    (:func:`local_parts`)."""
    import faiss

    _limit_threads(num_cpus)
    index = read_index(trained_uri)
    with tempfile.TemporaryDirectory(prefix="qgs-merge-") as tmp:
        if mode == "ondisk":
            from faiss.contrib.ondisk import merge_ondisk

            # merge_ondisk mmaps every part at once: all local files, never read whole
            with local_parts(part_uris, tmp, ahead=len(part_uris), keep=True) as paths:
                local = list(paths)
                base = posixpath.basename(out_uri)
                merge_ondisk(index, local, os.path.join(tmp, base + ".ivfdata"))
            faiss.write_index(index, os.path.join(tmp, base))
            ntotal = index.ntotal
            del index
            for suffix in (".ivfdata", ""):
                storage.put_file(os.path.join(tmp, base + suffix), out_uri + suffix)
            return ntotal
        ivf = faiss.try_extract_index_ivf(index)
        with local_parts(part_uris, tmp) as paths:
            if ivf is not None and is_block_lists(ivf):
                merge_block_lists(index, [faiss.read_index(p) for p in paths])
            else:
                for uri, path in zip(part_uris, paths, strict=True):
                    part = faiss.read_index(path)
                    if ivf is not None:
                        p_ivf = faiss.extract_index_ivf(part)
                        if p_ivf.nlist != ivf.nlist or p_ivf.code_size != ivf.code_size:
                            raise ValueError(f"{uri}: index part does not match {trained_uri}")
                        ivf.invlists.merge_from(p_ivf.invlists, 0)
                        ivf.ntotal += p_ivf.ntotal
                        index.ntotal = ivf.ntotal
                    else:
                        index.merge_from(part, 0)
                    del part
    write_index(index, out_uri)
    return index.ntotal


def merge_marker(index_uri: str, rel: str) -> str:
    """The done marker of merged shard ``rel`` (``shards/_done/<name>.json``)."""
    return storage.join(index_uri, posixpath.dirname(rel), storage.DONE_DIR,
                        posixpath.basename(rel).removesuffix(".faiss") + ".json")


def merged_before(index_uri: str, rel: str, job: dict) -> int | None:
    """The vector count of shard ``rel`` when a merge of the same ``job`` (its parts, mode
    and build key) finished it before (its marker, written after its files), else None."""
    uri = merge_marker(index_uri, rel)
    if not storage.exists(uri):
        return None
    m = storage.read_json(uri)
    files = [rel] + ([rel + ".ivfdata"] if job["mode"] == "ondisk" else [])
    if m.get("job") != job or not all(storage.exists(storage.join(index_uri, f))
                                      for f in files):
        return None
    return int(m["ntotal"])


def merge_shard(trained_uri: str, part_uris: list[str], index_uri: str, rel: str, job: dict,
                num_cpus: float) -> int:
    """:func:`merge_parts` into shard ``rel`` of ``index_uri``, then its done marker (a
    re-run after a crash keeps the shards merged: :func:`merged_before`)."""
    n = merge_parts(trained_uri, part_uris, storage.join(index_uri, rel), job["mode"],
                    num_cpus)
    storage.write_json(merge_marker(index_uri, rel), {"job": job, "ntotal": n})
    return n


def is_block_lists(ivf: Any) -> bool:
    """Fast-scan IVF (``PQ..x4fs``): codes packed in blocks (``BlockInvertedLists``)."""
    import faiss

    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.BlockInvertedLists)


def merge_block_lists(index: Any, parts: list) -> None:
    """Merge fast-scan parts into the empty trained ``index``, list by list, each list added
    once to an empty list. (faiss 1.15's ``BlockInvertedLists::add_entries`` appending to a
    non-empty list whose size is a multiple of its block size in bytes copies past the end
    of the list: heap corruption, seen as SIGSEGV / "corrupted double-linked list" in merge
    tasks; ``merge_into`` and ``merge_from`` go through it.) Codes are unpacked per block of
    ``packer.nvec`` with faiss' ``CodePacker`` and packed again."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if ivf.ntotal:
        raise ValueError("merge_block_lists: the trained index must be empty")
    packer = ivf.get_CodePacker()
    nvec, bs, cs = packer.nvec, packer.block_size, packer.code_size
    invs = []
    for part in parts:
        p_ivf = faiss.extract_index_ivf(part)
        if p_ivf.nlist != ivf.nlist or p_ivf.code_size != ivf.code_size:
            raise ValueError("index part does not match the trained index")
        invs.append(p_ivf.invlists)
    for j in range(ivf.nlist):
        sizes = [inv.list_size(j) for inv in invs]
        total = sum(sizes)
        if not total:
            continue
        ids = np.empty(total, np.int64)
        flat = np.zeros(((total + nvec - 1) // nvec) * nvec * cs, np.uint8)
        row = 0
        for inv, n in zip(invs, sizes, strict=True):
            if not n:
                continue
            ids[row:row + n] = faiss.rev_swig_ptr(inv.get_ids(j), n)
            nb = (n + nvec - 1) // nvec
            packed = faiss.rev_swig_ptr(inv.get_codes(j), nb * bs)
            unpacked = np.empty(nb * nvec * cs, np.uint8)
            for b in range(nb):
                packer.unpack_all(faiss.swig_ptr(packed[b * bs:]),
                                  faiss.swig_ptr(unpacked[b * nvec * cs:]))
            flat[row * cs:(row + n) * cs] = unpacked[:n * cs]
            row += n
        blocks = np.zeros(len(flat) // (nvec * cs) * bs, np.uint8)
        for b in range(len(flat) // (nvec * cs)):
            packer.pack_all(faiss.swig_ptr(flat[b * nvec * cs:]),
                            faiss.swig_ptr(blocks[b * bs:]))
        ivf.invlists.add_entries(j, total, faiss.swig_ptr(ids), faiss.swig_ptr(blocks))
    ivf.ntotal = index.ntotal = sum(inv.compute_ntotal() for inv in invs)


# ---------------------------------------------------------------- driver
def shard_rows(uris: list[str]) -> tuple[list[int], int]:
    """Row count of every embedding shard and the vector dimension (parquet footers only,
    per shard: :func:`qgscale.runtime.map_shards`, on Ray tasks for remote or many files)."""
    found = list(map_shards(_footer, uris))
    dims = sorted({d for _, d in found})
    if len(dims) > 1:
        raise ValueError(f"{uris[0]}: embedding shards of dimensions {dims} in one folder")
    return [n for n, _ in found], dims[0] if dims else 0


def _footer(uri: str) -> tuple[int, int]:
    """An embedding shard's rows and vector dimension, from its parquet footer."""
    fs, path = storage.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f)
        vec = meta.schema_arrow.field("vector").type
        if not pa.types.is_fixed_size_list(vec):
            raise ValueError(f"{uri}: field 'vector' must be a fixed-size list")
        return meta.metadata.num_rows, vec.list_size


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
    if bc.merge == "ondisk" and "fs" in factory.split(",")[-1]:
        raise ValueError(f"index.build.merge=ondisk: fast-scan factory {factory!r} keeps codes "
                         "in blocks that OnDiskInvertedLists cannot hold; use merge: memory")
    est = estimate(factory, n, dim)
    print(f"[index build] {n} vectors x {dim} -> {factory}: ~{est['index_gb']:.2f} GiB index, "
          f"nlist={est['nlist']}, train samples={min(bc.train_samples, n)} "
          f"(min {est['min_train_samples']})", flush=True)
    nodes = sum(1 for nd in ray.nodes() if nd.get("Alive"))
    plan = memory_plan(factory, n, dim, bc.num_shards or len(uris), max(1, nodes),
                       bc.train_samples, max(counts), gpu=bool(bc.gpus_per_actor))
    print(format_plan(plan), flush=True)
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
                       enumerate(zip(uris, sample_quotas(counts, k, seed), strict=True)) if q] \
                if k else []
            # a GPU for k-means only: nothing to train (Flat, HNSW) holds none
            res = actor_resources("index.build", 1, bc.cpus_per_actor,
                                  bc.gpus_per_actor if k else 0)
            train = ray.remote(train_index).options(**res.options())
            with requesting("index.build", bundles(res)):
                info = ray.get(train.remote(factory, bc.metric, dim, trained_uri, *samples,
                                            k=k, threads=res.threads, gpus=res.num_gpus,
                                            gpus_explicit=bool(bc.gpus_per_actor)))
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
                               # add on GPUs only when asked for explicitly
                               bc.model_copy(update={"gpus_per_actor":
                                                      bc.gpus_per_actor or 0}),
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
            merge = ray.remote(merge_shard).options(**task_options)
            merged, running = [], []
            for f, g in zip(shard_files, groups, strict=True):  # a merge done before a crash
                job = {"parts": [names[i] for i in g], "mode": "ondisk" if ondisk else "memory",
                       "config_hash": chash}  # is kept
                done = merged_before(index_uri, f, job)
                if done is None:
                    running.append(merge.remote(trained_uri, [part_uris[i] for i in g],
                                                index_uri, f, job, bc.cpus_per_actor))
                else:
                    merged.append(done)
            merged += ray.get(running)
            if sum(merged) != n:
                raise RuntimeError(f"{index_uri}: merged {sum(merged)} != {n} vectors")
    rates = {f"{p[:-2]}_vectors_per_s": round(n / max(timings[p], 1e-9), 1)
             for p in ("add_s", "merge_s")}
    return storage.write_manifest(index_uri, chash, factory=factory, metric=bc.metric,
                                  dim=dim, ntotal=n, shards=shard_files, ondisk=ondisk,
                                  embedding_rows=[int(c) for c in counts],
                                  estimate=est, memory_plan=plan, timings=timings | rates,
                                  embeddings=emb_uri)


def run_build(cfg, emb_uri: str, index_uri: str, key: str) -> dict:
    """Stage function ``index build``: embedding shards at ``emb_uri`` -> the FAISS index at
    ``index_uri`` (``cfg.index.build``)."""
    return build_index(emb_uri, index_uri, cfg.index.build, key, cfg.run.seed)
