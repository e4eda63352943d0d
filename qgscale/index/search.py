"""Search a built index: fan out over its shards, merge top-k by score, map ids to pids.

Two fan-outs: ``faiss.IndexShards`` in this process (:func:`search`, for a process whose job
is to hold the index), or one Ray actor per shard (:class:`ShardedSearcher`: mining, eval,
``qgscale search``; its actors' resources: :func:`search_resources`) that also holds the pids
of its shard's ids, with the top-k merged by ``faiss.ResultHeap``: there the caller holds
neither index nor id map. Scores are higher-is-better: inner products, or negated squared L2
distances.

Optional re-ranking (``refine="flat"|"fp16"``): the top ``k * k_factor`` candidates of the
(compressed) index are re-scored with the exact vectors, read back in id order from the
embedding shards the index was built from, so index files stay compact and every layout is
refined: in this process a ``faiss.IndexRefine`` over the whole fan-out; with actors, each
actor re-ranks its own shard's top ``k * k_factor`` with its shard's vectors (no process holds
every vector), and the exact scores are merged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.errors import ConfigError
from qgscale.index.vectors import iter_vectors
from qgscale.runtime import (
    Resources,
    actor_resources,
    check_fits,
    cluster_capacity,
    remote_options,
)

log = logging.getLogger("qgscale")

REFINE_KINDS = ("none", "flat", "fp16")


_WRAPPER_ATTRS = ("index", "base_index", "index_ivf", "sub_indexes", "at")  # sub-index holders


def _inner_indexes(index: Any) -> list | None:
    """The indexes directly inside a wrapper (PreTransform, IDMap, IDMap2; a Refine's base) or
    a fan-out (IndexShards, IndexReplicas: also what a multi-GPU clone is); None otherwise."""
    import faiss

    if isinstance(index, faiss.IndexRefine):
        inner = [index.base_index]
    elif isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap)):
        inner = [index.index]
    elif isinstance(index, faiss.ThreadedIndexBase):
        inner = [index.at(i) for i in range(index.count())]
    else:
        return None
    return [faiss.downcast_index(i) for i in inner]


def set_search_params(index: Any, nprobe: int | None = None, ef_search: int | None = None):
    """Set ``nprobe`` on every IVF index (CPU ``IndexIVF``, GPU ``GpuIndexIVF*``) and
    ``efSearch`` on every HNSW inside ``index``, through :func:`_inner_indexes`. Given
    ``nprobe``, an index wrapping others in a way not known here is a ``ValueError``: it may
    hold IVF lists, which would be searched at their stored nprobe (1 in every index file)."""
    import faiss

    index = faiss.downcast_index(index)
    inner = _inner_indexes(index)
    if inner is not None:
        for sub in inner:
            set_search_params(sub, nprobe, ef_search)
    elif hasattr(index, "nprobe"):  # faiss.IndexIVFInterface
        if nprobe is not None:
            index.nprobe = nprobe
    elif hasattr(index, "hnsw"):
        if ef_search is not None:
            index.hnsw.efSearch = ef_search
    elif nprobe is not None and any(hasattr(index, a) for a in _WRAPPER_ATTRS):
        raise ValueError(f"nprobe={nprobe}: cannot set it on the indexes inside "
                         f"{type(index).__name__}, a wrapper set_search_params does not know")


def read_index_file(index_uri: str, rel: str, ondisk: bool):
    """Read one index shard; on-disk IVF shards are fetched next to their .ivfdata and mmapped.
    A kept part (written without its coarse quantizer) gets the trained one back."""
    import faiss

    from qgscale.index.build import has_quantizer, read_index, restore_quantizer

    uri = storage.join(index_uri, rel)
    if not ondisk:
        index = read_index(uri)
        if not has_quantizer(index):
            index = restore_quantizer(index, read_index(storage.join(index_uri,
                                                                     "trained.faiss")))
        return index
    name = os.path.basename(rel)  # this shard's two files, not the folder of every shard
    folder = storage.local_dir(storage.join(index_uri, os.path.dirname(rel)),
                               names=[name, name + ".ivfdata"])
    return faiss.read_index(os.path.join(folder, name),
                            faiss.IO_FLAG_ONDISK_SAME_DIR)


def read_pids(index_uri: str) -> np.ndarray:
    """The id map: ``pids[id]`` (ids are the contiguous row numbers 0..n-1)."""
    table = storage.read_parquet(storage.join(index_uri, "ids"), ["id", "pid"])
    ids = table.column("id").to_numpy()
    order = np.argsort(ids)
    if not np.array_equal(ids[order], np.arange(len(ids))):
        raise ValueError(f"{index_uri}/ids: ids are not exactly 0..{len(ids) - 1}")
    return np.asarray(table.column("pid").to_pylist(), dtype=object)[order]


def id_files(index_uri: str) -> list[tuple[str, int, int]]:
    """The id map's files as ``(uri, first id, rows)`` in id order, from its manifest: the
    build gives file ``part-<i>`` (embedding shard ``i`` on, in the order of their names)
    the ids that follow those of the files before it (:class:`qgscale.index.build.AddJob`).
    :class:`PidMap` checks that the ids it reads are the ones it wants."""
    ids_uri = storage.join(index_uri, "ids")
    m = storage.read_manifest(ids_uri)
    if m is None:
        raise FileNotFoundError(f"{ids_uri}: no {storage.MANIFEST} (the build did not finish)")
    shards = sorted(m["shards"], key=lambda s: int(s["name"].rsplit("-", 1)[1]))
    firsts = np.concatenate([[0], np.cumsum([s["rows"] for s in shards])[:-1]])
    return [(storage.join(ids_uri, s["file"]), int(f), s["rows"])
            for s, f in zip(shards, firsts, strict=True)]


def id_column(index_uri: str, ids: np.ndarray, column: str
              ) -> tuple[np.ndarray, pa.Array] | None:
    """``(sorted unique ids, their values of the id map's column)``, read from only the id
    map files that hold ``ids`` (:func:`id_files`; columns ``id`` and ``column``); None when
    one of those files lacks the column (``lang``: an index built before it was written)."""
    want = np.sort(ids)  # np.unique's hashing costs ~1 s per million ids; a sort ~0.05
    want = want[np.concatenate([[True], want[1:] != want[:-1]])] if len(want) else want
    got_ids, got = [], []
    for uri, first, rows in id_files(index_uri):
        if np.searchsorted(want, first + rows) == np.searchsorted(want, first):
            continue  # none of its ids is wanted
        t = storage.read_columns(uri, ["id", column])
        if t is None:
            return None
        tid = t.column("id").to_numpy()
        pos = np.minimum(np.searchsorted(want, tid), max(len(want) - 1, 0))
        keep = np.flatnonzero(want[pos] == tid) if len(want) else np.empty(0, int)
        got_ids.append(tid[keep])
        col = t.column(column).take(keep)  # strings as large_string: >2 GiB per actor
        got.append(pc.cast(col, pa.large_string()) if pa.types.is_string(col.type) else col)
    all_ids = np.concatenate(got_ids) if got_ids else np.empty(0, np.int64)
    order = np.argsort(all_ids)
    if not np.array_equal(all_ids[order], want):
        raise ValueError(f"{index_uri}/ids: the id map lacks or repeats ids of this shard")
    values = (pa.chunked_array([c for t in got for c in t.chunks]).combine_chunks()
              if got else pa.array([], pa.large_string()))
    return all_ids[order], values.take(pa.array(order))


def index_ids(index: Any) -> np.ndarray:
    """Every id stored in an index (IVF inverted lists, or an IDMap's id table)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return faiss.vector_to_array(faiss.downcast_index(index).id_map)
    inv = ivf.invlists
    out = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
           for i in range(ivf.nlist) if inv.list_size(i)]
    return np.concatenate(out) if out else np.empty(0, np.int64)


@dataclass
class PidMap:
    """The pids of some ids (one index shard's): sorted int64 ids and an Arrow string array of
    their pids (no Python object per passage)."""

    ids: np.ndarray
    pids: pa.Array

    @classmethod
    def read(cls, index_uri: str, ids: np.ndarray) -> PidMap:
        """Read the id map files that hold ``ids`` (:func:`id_files`), keeping only those
        ids: reads and memory O(this shard), not the corpus's id map."""
        got = id_column(index_uri, ids, "pid")
        if got is None:
            raise ValueError(f"{index_uri}/ids: an id map file has no 'pid' column")
        return cls(got[0], pc.cast(got[1], pa.large_string()))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Pids of ``ids`` (None for -1, no hit), as an object array shaped like ``ids``."""
        out = np.full(ids.shape, None, dtype=object)
        ok = ids >= 0
        pos = np.searchsorted(self.ids, ids[ok])
        out[ok] = self.pids.take(pa.array(pos)).to_numpy(zero_copy_only=False)
        return out


def load_refine_store(index_uri: str, m: dict, pids: Any, kind: str,
                      ids: np.ndarray | None = None):
    """The exact vectors of ``ids`` (sorted global ids; None: every id) in id order
    (``IndexFlat``, or ``SQfp16`` for ``fp16``), streamed from the embedding shards of the
    index's manifest (global id = row number across them; their row counts from the
    manifest's ``embedding_rows``, else the parquet footers), reading only the shards that hold
    some of ``ids`` and keeping only those rows: reads and memory O(len(ids)). ``pids``: the
    pids of ``ids`` (of every id when None), which the rows' pids must match."""
    import faiss

    from qgscale.index.build import metric_type, shard_rows

    if kind not in REFINE_KINDS[1:]:
        raise ValueError(f"index.refine: expected one of {REFINE_KINDS}, got {kind!r}")
    emb = m.get("embeddings")
    if not emb:
        raise ValueError(f"{index_uri}/{storage.MANIFEST}: no 'embeddings' to refine with")
    metric = metric_type(m["metric"])
    store = (faiss.IndexFlat(m["dim"], metric) if kind == "flat" else
             faiss.IndexScalarQuantizer(m["dim"], faiss.ScalarQuantizer.QT_fp16, metric))
    want = np.arange(len(pids)) if ids is None else ids
    files = storage.list_files(emb, ".parquet")
    counts = m.get("embedding_rows") or shard_rows(files)[0]
    if len(counts) != len(files) or sum(counts) != m["ntotal"]:
        raise ValueError(f"{emb}: {sum(counts)} vectors, index {index_uri} has {m['ntotal']}")
    start = 0  # global id of the block's first row
    for uri, n in zip(files, counts, strict=True):
        if np.searchsorted(want, start + n) == np.searchsorted(want, start):
            start += n  # none of its rows is wanted
            continue
        for block_pids, vecs in iter_vectors(uri):
            lo, hi = np.searchsorted(want, [start, start + len(vecs)])
            rows = want[lo:hi] - start
            got = block_pids.take(pa.array(rows)).to_pylist()
            expected = pids[lo:hi]
            if got != (expected.to_pylist() if isinstance(expected, pa.Array)
                       else list(expected)):
                raise ValueError(f"{uri}: pids differ from the id map of {index_uri} at ids "
                                 f"{start}..{start + len(vecs) - 1} (embeddings changed "
                                 "since the build?)")
            if len(rows):
                store.add(np.ascontiguousarray(vecs[rows]))
            start += len(vecs)
    if start != m["ntotal"] or store.ntotal != len(want):
        raise ValueError(f"{emb}: {start} vectors, index {index_uri} has {m['ntotal']}")
    return store


def rerank(store, x: np.ndarray, ids: np.ndarray, k: int, metric: str):
    """Re-score candidate ``ids`` (-1 = none) with the exact vectors of ``store``; top ``k``
    ``(dist, ids)`` in faiss order (largest inner product / smallest L2 first)."""
    ok = ids >= 0
    vecs = store.reconstruct_batch(np.where(ok, ids, 0).ravel()).reshape(*ids.shape, -1)
    dist = (np.einsum("qkd,qd->qk", vecs, x) if metric == "ip"
            else ((vecs - x[:, None, :]) ** 2).sum(-1))
    dist = np.where(ok, dist, -np.inf if metric == "ip" else np.inf).astype(np.float32)
    order = np.argsort(-dist if metric == "ip" else dist, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(dist, order, 1)
    return top, np.where(np.isfinite(top), np.take_along_axis(ids, order, 1), -1)


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
    store: Any = None  # exact vectors under an IndexRefine (refine != "none")
    k_factor: float = 4.0  # the IndexRefine's: re-rank the top k * k_factor

    def search(self, x: np.ndarray, k: int):
        dist, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), k)
        return _to_results(dist, ids, self.pids, self.metric)


def load_index(index_uri: str, nprobe: int | None = None, ef_search: int | None = None,
               refine: str = "none", k_factor: float = 4.0) -> LoadedIndex:
    """Load every shard of an index (one index, or ``IndexShards``), optionally wrapped in an
    ``IndexRefine`` that re-ranks the top ``k * k_factor`` with the exact vectors."""
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
    pids = read_pids(index_uri)
    store = None
    if refine != "none":
        store = load_refine_store(index_uri, m, pids, refine)
        index = faiss.IndexRefine(index, store)
        index.k_factor = k_factor
    return LoadedIndex(index, pids, m["metric"], parts, store, k_factor)


_CACHE: dict[tuple, LoadedIndex] = {}


def search(index_uri: str, query_vectors: np.ndarray, k: int, nprobe: int | None = None,
           ef_search: int | None = None, refine: str = "none",
           k_factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` ``(pids, scores)`` for each query row; ``pids`` is an object array (None where
    fewer than k hits), ``scores`` float32 (NaN there). The loaded index is cached."""
    key = (index_uri, nprobe, ef_search, refine, k_factor)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_index(index_uri, nprobe, ef_search, refine, k_factor)
    return _CACHE[key].search(query_vectors, k)


def search_params(index: Any, sel: Any, nprobe: int | None = None,
                  ef_search: int | None = None):
    """FAISS search parameters with the id selector ``sel``, of the type the (wrapped)
    index expects (through PreTransform / IDMap wrappers)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(
            index_params=search_params(index.index, sel, nprobe, ef_search))
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_params(index.index, sel, nprobe, ef_search)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe or index.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search or index.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


LANG_LOOKUP_ROWS = 1 << 20  # corpus rows per lookup of a shard's language ids, at least
SEARCH_BLOCK = 4096  # queries per fan-out of a sharded search


class ShardSearcher:
    """Ray actor body: holds one index shard and the pids of its ids; returns raw
    ``(dist, ids)`` with global ids and their pids. A search may be restricted to the
    passages of one language: their ids come from the id map's ``lang`` column, or, for an
    index built without it, from a scan of ``corpus_uri``'s ``pid, lang`` columns."""

    def __init__(self, index_uri: str, rel: str, ondisk: bool, nprobe: int | None,
                 ef_search: int | None, threads: int = 1, gpus: float = 0.0,
                 gpus_explicit: bool = False, corpus_uri: str | None = None,
                 refine: str = "none", k_factor: float = 4.0):
        import faiss

        from qgscale.index.gpu import to_gpu, use_gpu

        on_gpu = use_gpu("index.search", gpus, gpus_explicit)
        faiss.omp_set_num_threads(max(1, threads))
        m = storage.read_manifest(index_uri)
        self.metric = m["metric"]
        self.index = read_index_file(index_uri, rel, ondisk)
        self.pid_map = PidMap.read(index_uri, index_ids(self.index))
        # this shard's exact vectors, in the order of pid_map.ids (refine: None when "none")
        self.store = (load_refine_store(index_uri, m, self.pid_map.pids, refine,
                                        self.pid_map.ids) if refine != "none" else None)
        self.k_factor = k_factor
        # on the CPU index: the GPU clone copies nprobe (GpuIndexIVF::copyFrom)
        set_search_params(self.index, nprobe, ef_search)
        if on_gpu:
            try:
                self.index = to_gpu(self.index)  # Flat: an fp16 copy (GpuIndexFlat useFloat16)
            except ConfigError as e:  # no GPU version (HNSW, fast-scan PQ)
                if gpus_explicit:
                    raise
                log.warning("index.search: %s: searching on the CPU", e)
                on_gpu = False
        if on_gpu:
            set_search_params(self.index, nprobe)  # each GpuIndexIVF; raises if it can't
        self.nprobe, self.ef_search = nprobe, ef_search
        self.index_uri, self.corpus_uri = index_uri, corpus_uri
        self._lang_ids: dict[str, np.ndarray] | None = None

    def lang_ids(self) -> dict[str, np.ndarray]:
        """``{lang: ids of this shard's passages in that language}`` (computed once): from
        the id map's ``lang`` column of this shard's ids (:func:`id_column`: its own files,
        O(this shard)). Without it (an index built from embeddings without ``lang``), the
        corpus's ``(pid, lang)`` columns are looked up in the shard's pids in groups of about
        as many rows as the shard holds: each lookup hashes the shard's pids once, so the
        work is O(corpus) in all, not O(corpus files x shard), but every search actor reads
        the whole corpus's two columns."""
        got = (id_column(self.index_uri, self.pid_map.ids, "lang")
               if self._lang_ids is None else None)
        if got is not None:
            ids, langs = got
            self._lang_ids = {
                value: ids[pc.fill_null(pc.equal(langs, value), False).to_numpy(
                    zero_copy_only=False)]
                for value in pc.unique(langs).drop_null().to_pylist()}
        if self._lang_ids is None:
            from qgscale.data.corpus import scan

            if self.corpus_uri is None:
                raise ValueError("a language-restricted search of an index without passage "
                                 "languages in its id map needs the corpus_uri")
            found: dict[str, list[np.ndarray]] = {}
            group: list[pa.Table] = []

            def lookup() -> None:
                t = pa.concat_tables(group).combine_chunks()
                group.clear()
                pos = pc.index_in(pc.cast(t.column("pid"), pa.large_string()),
                                  value_set=self.pid_map.pids)
                ids = self.pid_map.ids[pos.drop_null().to_numpy()]
                lang = t.column("lang").filter(pc.is_valid(pos))
                for value in pc.unique(lang).to_pylist():
                    mask = pc.fill_null(pc.equal(lang, value), False).to_numpy(
                        zero_copy_only=False)
                    found.setdefault(value, []).append(ids[mask])

            rows, batch = 0, max(len(self.pid_map.pids), LANG_LOOKUP_ROWS)
            for t in scan(self.corpus_uri, None, ("pid", "lang")):
                group.append(t)
                rows += t.num_rows
                if rows >= batch:
                    lookup()
                    rows = 0
            if group:
                lookup()
            self._lang_ids = {k: np.sort(np.concatenate(v)).astype(np.int64)
                              for k, v in found.items()}
        return self._lang_ids

    def search(self, x: np.ndarray, k: int, lang: str | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-``k`` of this shard (among ``lang``'s passages only when given); with a
        refine store, its top ``k * k_factor`` re-ranked with the exact vectors."""
        k_base = int(k * self.k_factor) if self.store is not None else k
        if lang is None:
            dist, ids = self.index.search(x, k_base)
        else:
            import faiss

            sel = faiss.IDSelectorBatch(self.lang_ids().get(lang, np.empty(0, np.int64)))
            dist, ids = self.index.search(x, k_base, params=search_params(
                self.index, sel, self.nprobe, self.ef_search))
        if self.store is not None:  # global ids -> rows of the store, and back
            rows = np.where(ids >= 0, np.searchsorted(self.pid_map.ids, ids), -1)
            dist, rows = rerank(self.store, x, rows, k, self.metric)
            ids = np.where(rows >= 0, self.pid_map.ids[np.maximum(rows, 0)], -1)
        return dist, ids, self.pid_map.lookup(ids)


def pids_of(want: np.ndarray, ids: np.ndarray, pids: np.ndarray) -> np.ndarray:
    """Row by row, the pids of ids ``want`` (None for -1), looked up among ``ids`` (same
    rows; -1 for none) whose pids are ``pids``: one sort of ``(row, id)`` keys."""
    if ids.size and ids.max() >= 1 << 40:
        raise ValueError("ids of 2^40 and more are not supported")
    rows = np.arange(len(ids), dtype=np.int64)[:, None] << 40
    have = (rows | np.maximum(ids, 0))[ids >= 0]
    order = np.argsort(have, kind="stable")
    keys = have[order]
    ok = want >= 0
    wanted = (rows | np.maximum(want, 0))[ok]
    pos = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    if len(wanted) and (not len(keys) or not np.array_equal(keys[pos], wanted)):
        raise RuntimeError("a merged id is in no shard's result")
    out = np.full(want.shape, None, dtype=object)
    out[ok] = pids[ids >= 0][order[pos]]
    return out


def gpu_shares(shards: int, gpus: int, encoder: bool = True) -> tuple[float, float]:
    """``(each search actor's, the query encoder's)`` GPUs when ``shards`` search actors and
    the ``encoder`` share ``gpus`` GPUs: a GPU each while there are enough; else as many
    search actors on each GPU as needed (1/2, 1/3, ... each); and when they fill every GPU,
    the encoder takes a tenth of a search actor's share beside them (queries are encoded
    between searches) rather than every search actor giving up half its GPU for it."""
    per = -(-shards // max(1, gpus))  # search actors per GPU

    def units(x: float) -> float:  # Ray counts GPUs in 1/10,000ths: rounded down, they fit
        return math.floor(x * 10_000) / 10_000

    if not encoder or shards < gpus * per:  # a free slot left for the encoder
        return units(1 / per), units(1 / per)
    return units(0.9 / per), units(0.1 / per)


def search_resources(index_uri: str, sc: Any, encoder: bool = True
                     ) -> tuple[Resources, Resources]:
    """``(search actors, query encoder)`` of one search of ``index_uri`` with the
    ``index.search`` settings ``sc``: one search actor per index shard, and the query encoder
    (an actor or task; none for ``qgscale search``, which encodes in its own process: 0
    actors), all alive at once, each of ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs
    (:func:`qgscale.runtime.bundles` gives their shapes). Unset ``gpus_per_actor``: a GPU each
    when the cluster has GPUs (:func:`~qgscale.runtime.actor_resources`), shared
    (:func:`gpu_shares`) when there are more actors than GPUs. Actors that can never all fit
    the cluster are a :class:`~qgscale.runtime.ResourceError`, not a stage waiting forever."""
    m = storage.read_manifest(index_uri)
    if m is None:
        raise FileNotFoundError(f"{index_uri}: no {storage.MANIFEST}")
    shards, coders = len(m["shards"]), int(encoder)
    res = actor_resources("index.search", 1, sc.cpus_per_actor, sc.gpus_per_actor)
    cpus, gpus = res.num_cpus, res.num_gpus
    shard_gpus = coder_gpus = gpus
    if gpus and sc.gpus_per_actor is None:
        now, most = cluster_capacity("GPU")
        if shards + coders > (can := int(now if most is None else most)):
            shard_gpus, coder_gpus = gpu_shares(shards, can, encoder)
            log.info("index.search: %d search actors on %d GPUs: %g GPU each%s", shards, can,
                     shard_gpus, f", the query encoder {coder_gpus:g}" if encoder else "")
    # all of them with the encoder's share (the smaller one: with shares, every search actor
    # has its GPU slot by construction, and this checks their CPUs fit the GPU nodes too)
    check_fits(Resources("index.search", shards + coders, cpus, coder_gpus),
               f"{index_uri} has {shards} shards: a search actor each"
               + (" and a query encoder" if encoder else ""),
               "lower index.search.cpus_per_actor / gpus_per_actor (fractions are allowed: "
               "actors then share a CPU or GPU) or build the index in fewer shards "
               "(index.build.num_shards)")
    return (Resources("index.search", shards, cpus, shard_gpus),
            Resources("index.search", coders, cpus, coder_gpus))


class ShardedSearcher:
    """Fan-out search over Ray actors (one per index shard, each holding its shard's pids:
    this process holds neither the index nor the id map); merge with ``faiss.ResultHeap``.
    With ``refine``, every actor also holds its shard's exact vectors and re-ranks its top
    ``k * k_factor`` with them; the exact scores are merged (a superset of the candidates one
    refined fan-out would re-rank: the same or a better top-k)."""

    def __init__(self, index_uri: str, nprobe: int | None = None, ef_search: int | None = None,
                 num_cpus: float = 1.0, refine: str = "none", k_factor: float = 4.0,
                 num_gpus: float = 0.0, gpus_explicit: bool = False,
                 corpus_uri: str | None = None):
        import ray

        m = storage.read_manifest(index_uri)
        if m is None:
            raise FileNotFoundError(f"{index_uri}: no {storage.MANIFEST}")
        self.metric = m["metric"]
        check_fits(Resources("index.search", len(m["shards"]), num_cpus, num_gpus),
                   f"{index_uri} has {len(m['shards'])} shards: a search actor each",
                   "lower index.search.cpus_per_actor / gpus_per_actor or build the index in "
                   "fewer shards (index.build.num_shards)")
        actor = ray.remote(ShardSearcher).options(**remote_options(num_cpus, num_gpus))
        self.actors = [actor.remote(index_uri, rel, m.get("ondisk", False), nprobe, ef_search,
                                    max(1, int(num_cpus)), num_gpus, gpus_explicit,
                                    corpus_uri, refine, k_factor)
                       for rel in m["shards"]]

    def search(self, x: np.ndarray, k: int, lang: str | None = None):
        """Top-``k`` ``(pids, scores)`` as :func:`search`; ``lang``: among the passages of
        that language only (exact restriction; ``corpus_uri`` must be given for an index whose
        id map has no languages: :meth:`ShardSearcher.lang_ids`). Queries go out
        in blocks of :data:`SEARCH_BLOCK` (all submitted at once, so the actors never wait),
        and each block's shard results are merged one at a time: this process holds one
        shard's result for one block, not every shard's for every query."""
        import ray

        x = np.ascontiguousarray(x, dtype=np.float32)
        blocks = [x[i:i + SEARCH_BLOCK] for i in range(0, len(x), SEARCH_BLOCK)] or [x]
        pending = []
        for b in blocks:
            ref = ray.put(b)
            pending.append((len(b), [a.search.remote(ref, k, lang) for a in self.actors]))
        parts = [self._merge(n, k, futures) for n, futures in pending]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _merge(self, n: int, k: int, futures: list) -> tuple[np.ndarray, np.ndarray]:
        """One block's top-``k`` over the shards' results (``faiss.ResultHeap``, whose ties
        go as in one process's ``IndexShards``), folded in one at a time: the pids of the
        heap's ids are carried along (:func:`pids_of`), so this process holds the heap's and
        one shard's, whatever the number of shards (a dict of every shard's pids grew with
        shards x block x k)."""
        import faiss
        import ray

        heap = faiss.ResultHeap(n, k, keep_max=self.metric == "ip")
        ids_now = np.full((n, 0), -1, np.int64)
        pids_now = np.empty((n, 0), dtype=object)
        for f in futures:
            dist, ids, pids = ray.get(f)
            heap.add_result(dist, ids)
            held = heap.I.copy()  # the heap's ids now (-1: an empty slot)
            pids_now = pids_of(held, np.concatenate([ids_now, ids], axis=1),
                               np.concatenate([pids_now, pids], axis=1))
            ids_now = held
            del dist, ids, pids
        heap.finalize()
        dist, ids = heap.D, heap.I
        scores = dist if self.metric == "ip" else -dist
        return (pids_of(ids, ids_now, pids_now),
                np.where(ids >= 0, scores, np.nan).astype(np.float32))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
