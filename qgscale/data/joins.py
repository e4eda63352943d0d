"""Ray Data building blocks of the hash-partitioned joins that replace a driver's join when
the query side is too large for one process (:mod:`qgscale.train.rows_dataset`: training rows;
:mod:`qgscale.teacher.pairs_dataset`: the teacher's scoring pairs).

Tables are read by the workers from their parquet shard URIs (no filesystem object, so no
credentials, travels in a dataset), each row numbered by (shard, row) for errors; the corpus
side of a join on pid is filtered where it is read by a Bloom filter of the pids needed
(:func:`pid_filter`), so a shuffle carries the passages used, not the corpus; sorted rows are
written as shards by the workers (:func:`write_sorted`); a worker's DataError is raised on the
driver as itself (:func:`unwrapped`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.corpus import check as check_corpus
from qgscale.data.corpus import corpus_shards
from qgscale.data.pidfilter import PidFilter, key_hashes
from qgscale.data.schema import blank, passage_text
from qgscale.errors import DataError

ORDER = "order"  # the int64 column rows are sorted by before write_sorted writes them


def shard_files(uri: str | list[str], what: str) -> list[str]:
    """The parquet shards of ``uri`` (a folder or a file; of each URI of a list, in order):
    the files :func:`dataset` numbers its rows by; a URI with none is a DataError."""
    files = []
    for u in [uri] if isinstance(uri, str) else uri:
        fs, path = storage.url_to_fs(u)
        fs.invalidate_cache(path)  # as storage.exists(): s3fs answers from a cached listing
        found = (corpus_shards(u) if what == "corpus" else storage.list_files(u, ".parquet")
                 if fs.isdir(path) else [u] if fs.exists(path) else [])
        if not found:
            raise DataError(f"{u}: {what} not found")
        files += found
    return files


def dataset(uri: str | list[str], what: str, columns: list[str], check: Any = None) -> Any:
    """A dataset of the parquet shards of ``uri`` (:func:`shard_files`), read by the workers
    (one shard a block), with ``_row`` = (shard index, row) for errors and ordering;
    ``check(table, uri)`` raises on bad rows."""
    import ray

    files = shard_files(uri, what)

    def read(batch: dict[str, Any]) -> pa.Table:
        out = []
        for i, u in zip(batch["i"], batch["uri"], strict=True):
            t = storage.read_parquet(str(u), columns)
            if check is not None:
                check(t, str(u))
            out.append(t.append_column("_row", pa.array(
                int(i) * (1 << 32) + np.arange(t.num_rows, dtype=np.int64))))
        return pa.concat_tables(out)

    items = [{"i": i, "uri": f} for i, f in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=len(files)).map_batches(
        read, batch_size=1, batch_format="numpy")


def check_text(key: str, fields: tuple[str, ...]) -> Any:
    """A check that no ``fields`` value is empty, naming the row by ``key``."""
    def check(t: pa.Table, uri: str) -> None:
        for field in fields:
            bad = blank(t.column(field))
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                raise DataError(f"{uri}: row {i} ({key}={t.column(key)[i].as_py()}): empty "
                                f"field {field!r}")
    return check


def unwrapped(build: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``build(*args, **kwargs)``, a worker's DataError re-raised as itself."""
    try:
        return build(*args, **kwargs)
    except DataError:
        raise
    except Exception as e:  # a worker's DataError arrives wrapped by Ray
        cause = data_error(e)
        if cause is None:
            raise
        raise cause from None


def data_error(e: BaseException) -> DataError | None:
    """The worker's DataError inside Ray Data's wrapping (its exception chain, or the text
    of the worker's traceback, which Ray Data passes on as a string)."""
    todo: list[Any] = [e]
    seen: set[int] = set()
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DataError):
            return DataError(str(x.args[0]) if x.args else str(x))
        found = re.search(r"qgscale\.errors\.DataError: ([^\n]+)",
                          f"{x}\n{getattr(x, 'traceback_str', '')}")
        if found:
            return DataError(found.group(1))
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def queries_dataset(queries_uri: str | list[str]) -> Any:
    """``{qid, lang, text}`` of the queries (empty fields are DataErrors; a qid on two rows
    is found in the written rows, :func:`check_duplicate`)."""
    return dataset(queries_uri, "queries", ["qid", "lang", "text"],
                   check_text("qid", ("qid", "lang", "text"))).drop_columns(["_row"])


def check_duplicate(done: dict[str, Any], queries_uri: str | list[str],
                    lists_uri: str | None) -> None:
    """The row keys found twice (``done["duplicates"]``: a qid, or a qid and a pid joined by
    a tab, as :func:`write_sorted` reports them): a qid on two rows of the queries is a
    DataError naming both (file and row), as :func:`~qgscale.teacher.common.load_queries`;
    otherwise, with ``lists_uri`` (the candidates: one list per qid), one naming it. Only
    then are the query files scanned (qid column). The Ray path checks the qids its rows
    use; the driver's ``load_queries`` checks every row."""
    if not done["duplicates"]:
        return
    qids = sorted({k.split("\t")[0] for k in done["duplicates"]})
    seen: dict[str, tuple[str, int]] = {}
    for f in shard_files(queries_uri, "queries"):
        col = storage.read_parquet(f, ["qid"]).column("qid")
        for i in pc.indices_nonzero(pc.is_in(col, value_set=pa.array(qids))).to_pylist():
            q = col[i].as_py()
            if q in seen:
                raise DataError(f"{f}: row {i} (qid={q}): qid also in {seen[q][0]} row "
                                f"{seen[q][1]} (one row per qid)")
            seen[q] = (f, i)
    if lists_uri:
        raise DataError(f"{lists_uri}: qid={qids[0]} has two rows (one candidate list per qid)")


def pid_filter(ds: Any, at_most: int | None = None) -> PidFilter:
    """A :class:`~qgscale.data.pidfilter.PidFilter` of the ``pid`` column of ``ds`` (a
    materialized dataset: counted, then its hashes streamed here), sized for its rows or for
    ``at_most`` distinct pids if fewer (e.g. the corpus rows). Passed to a map as an
    argument, Ray Data ships it once per operator (in the object store with the map)."""
    n = ds.count()  # rows: at least the distinct pids (a filter a little larger)
    if at_most is not None:
        n = min(n, at_most)
    if not n:
        return PidFilter.build(0, [])
    hashes = ds.select_columns(["pid"]).map_batches(
        lambda t: pa.table({"h": key_hashes(t.column("pid"))}), batch_format="pyarrow")
    return PidFilter.build(n, (b["h"] for b in hashes.iter_batches(
        batch_format="numpy", batch_size=1 << 20)))


def kept(t: pa.Table, keep: PidFilter | None, column: str = "pid") -> pa.Table:
    return t if keep is None else t.filter(pa.array(keep.contains(t.column(column))))


def passages_dataset(corpus_uri: str, keep: PidFilter | None = None) -> Any:
    """``{pid, passage}`` of the corpus (title and text joined, as the models read them);
    ``keep`` (:func:`pid_filter`): only the rows whose pid it may hold (every row is still
    checked), so a join shuffles the passages it needs, not the corpus."""
    corpus = dataset(corpus_uri, "corpus", ["pid", "title", "text"], check_corpus)

    def passages(t: pa.Table, keep: PidFilter | None) -> pa.Table:
        t = kept(t, keep)
        return pa.table({"pid": t.column("pid"), "passage": [
            passage_text(a, b) for a, b in zip(t.column("title").to_pylist(),
                                               t.column("text").to_pylist(), strict=True)]})
    return corpus.map_batches(passages, fn_args=(keep,), batch_format="pyarrow")


MAX_REPORTED = 100  # duplicated row keys kept for the error


def write_sorted(ds: Any, out_uri: str, config_hash: str, shard_rows: int,
                 columns: list[str]) -> dict[str, Any]:
    """Workers write ``columns`` of ``ds`` (sorted by its int64 :data:`ORDER` column, then its
    row keys) as shards of ``shard_rows`` rows, named in that order by their first row's
    order key, then a hash of all its row keys (two shards share a name only if they hold the
    same keys); returns the rows, the shard names, the sum of every ``_``-prefixed count
    column and ``duplicates``: row keys (qid, or qid and pid) found on two rows (adjacent in
    the sorted rows: in one shard or at the end of one and the start of the next), at most
    :data:`MAX_REPORTED`. The rows dir is cleared first (rows are rebuilt whole, never mixed
    with an interrupted build's shards)."""
    storage.remove(out_uri, recursive=True)

    def write(t: pa.Table) -> pa.Table:
        keys = t.column("qid").to_pylist()
        if "pid" in t.column_names:  # a qid of many rows
            keys = [f"{q}\t{p}" for q, p in zip(keys, t.column("pid").to_pylist(), strict=True)]
        order = t.column(ORDER)[0].as_py()  # >= 0: its hex sorts as the number
        digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:8]
        name = f"part-{order:016x}-{digest}"
        storage.ShardWriter(out_uri, config_hash).write(name, t.select(columns))
        twice = sorted({a for a, b in itertools.pairwise(keys) if a == b})[:MAX_REPORTED]
        return pa.table({"name": [name], "rows": [t.num_rows], "first": [keys[0]],
                         "last": [keys[-1]], "twice": pa.array([twice], pa.list_(pa.string())),
                         **{
            c: [pc.sum(pc.cast(t.column(c), pa.int64())).as_py() or 0]
            for c in t.column_names if c.startswith("_")}})

    done = sorted(ds.map_batches(write, batch_size=shard_rows, batch_format="pyarrow"
                                 ).take_all(), key=lambda r: r["name"])
    # rows are sorted by key: a key twice is on adjacent rows, of one shard or two
    twice = {k for r in done for k in r["twice"]} | {
        a["last"] for a, b in itertools.pairwise(done) if a["last"] == b["first"]}
    counts: dict[str, Any] = {"rows": sum(r["rows"] for r in done),
                              "shards": [r["name"] for r in done],
                              "duplicates": sorted(twice)[:MAX_REPORTED]}
    for c in (done[0] if done else {}):
        if c.startswith("_"):
            counts[c] = sum(r[c] for r in done)
    return counts
