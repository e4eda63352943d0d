"""A passage collection (a TSV or JSONL file, e.g. psgs_w100, or a folder of them) -> corpus
shards, its files' byte ranges read in parallel.

``qgscale data prepare`` of a collection (format ``passages``; ``xor-tydi``'s, ``qas``' and
``dpr``'s ``passages``; ``beir``'s ``corpus.jsonl``; ``jsonl`` of kind ``corpus``, canonical
rows) cuts an uncompressed file into :class:`Unit` byte ranges (a unit: the lines that start
in it; 4 units per cluster CPU, 32-256 MB each; a compressed file is one unit) and reads
them on Ray tasks of one CPU each (here one after another without Ray, or for one unit). A
unit writes its own corpus shards (``part-<unit>-<j>``) and its passage ids, hashed into
buckets, to a work folder, then a record (its rows, lines, rejected rows): a re-run skips
the recorded units, and once the ids are checked it reads what the check found. A unit
numbers its lines from 1; the driver makes them the file's own from the earlier units' line
counts. The passage-id check runs per bucket (a task each: the bucket's ids of every unit,
sorted in Arrow): a duplicate fails (fail mode: the first in file order) or is dropped from
its shard (skip mode), naming both lines (:func:`write_collection`). Every row defect comes
first, as in one stream whose ids are checked after it: in fail mode a defect stops the
read, and a duplicate id before it is reported once it is mended; in skip mode the
duplicates follow the other rejected rows. A DPR file's named passages are crossed off in
the same check (each bucket's first copies joined with the named ids and the digests of
their inline copies), before the duplicates are handled.

Memory: a unit task holds one shard of rows and at most :data:`ID_FLUSH` ids (about 30
bytes each); a bucket task at most about :data:`BUCKET_IDS` ids at once (~1 GB with the
sort and the parquet reads; 2M ids measured ~0.2 GB over the process's own); the driver
the units' records (counts, shard names), the first
:data:`~qgscale.data.readers.HELD_REJECTS` rejected rows (the later ones in a local file)
and, in skip mode, the duplicates the check found as one Arrow table and their shards' row
offsets (about 120 bytes each), and a done marker per corpus shard (a few hundred bytes,
its dropped rows left out: 500k markers for 1B passages in shards of 2,000), never the
collection. The bucket check runs here only
without Ray. Every node reads the collection and writes the corpus: on a cluster, paths
that all nodes see (``s3://``, a shared file system; :func:`qgscale.runtime.check_shared`).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import math
import os
import posixpath
import re
import sys
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.utils import infer_compression

from qgscale import storage
from qgscale.data import readers
from qgscale.data.schema import CORPUS
from qgscale.data.unique import Dup, drop_duplicates, duplicate_reason
from qgscale.errors import ConfigError, DataError, MissingInputError

log = logging.getLogger(__name__)

UNIT_BYTES = 256 << 20  # of an uncompressed collection per unit, at most
BUCKET_IDS = 8 << 20  # ids per bucket, estimated from the first MiB's lines (gzip: x 4 text)
ID_FLUSH = 1 << 20  # ids a unit holds before it writes them ...
PACK_ROWS = 1 << 14  # ... packed into Arrow this many at a time
MIN_UNIT_BYTES = 32 << 20  # a unit's size on a cluster: 4 units per CPU, within these bounds
MAX_UNITS = 99_999  # units (5 digits) and a unit's shards (6: a 1B-row gzip file in shards of
MAX_SHARDS = 999_999  # 2,000): their names sort as the file's order
MAX_BUCKETS = 4096
PLAN_VERSION = 4  # of the work folder's layout: another version's plan is started afresh
TSV_COLUMNS = readers.TSV_COLUMNS  # psgs_w100's, when the file has no header line


@dataclass(frozen=True)
class Unit:
    """The lines of the collection's file ``file`` (its number) that start in bytes
    ``[start, end)`` (``end`` None: to the end of the file)."""

    index: int
    file: int
    start: int
    end: int | None

    @property
    def name(self) -> str:
        return f"u{self.index:05d}"


@dataclass(frozen=True)
class Job:
    """What every unit of one collection shares."""

    paths: list[str]  # the collection's files (absolute, as tasks elsewhere open them)
    lang: str
    out_uri: str  # the corpus folder
    work_uri: str  # the plan, unit records, ids (removed once checked), what the check found
    config_hash: str
    shard_rows: int
    fail: bool  # on_error fail: a unit stops at its first rejected row
    buckets: int
    columns: list[list[str] | None]  # a cut TSV file's columns (its header line's)
    plan_id: str  # a unit record or ids part of another plan (a late task's) is not read
    digests: bool = False  # a passage_digest beside each id (a DPR file's check) ...
    named_h: np.ndarray | None = None  # ... of the rows whose id's crc32 is one of these
    # (sorted): the passages the file names with their text; 0 for the other rows
    canonical: bool = False  # canonical corpus JSONL rows (pid, lang, title, text), not a
    # passage collection's (their language ``lang``)


class _Stop(Exception):
    """A unit's first rejected row in fail mode: the unit stops there."""


class _UnitRejects(readers.Rejects):
    """A unit's rejected rows, lines within the unit: recorded (all held: they go to the
    unit's record), and in fail mode the first one stops the unit (the driver raises it with
    the file's line number)."""

    def __init__(self, stop: bool):
        super().__init__("skip", held=sys.maxsize)
        self.stop = stop

    def bad(self, file: str, line: int | None, fld: str | None, reason: str,
            raw: Any = None) -> None:
        super().bad(file, line, fld, reason, raw)
        if self.stop:
            raise _Stop


def _is_jsonl(path: str) -> bool:
    return readers.JSONL_FILE.search(path) is not None


def unit_bytes_for(size: int) -> int:
    """Bytes per unit of a ``size``-byte collection: 4 units per CPU of the Ray cluster,
    within :data:`MIN_UNIT_BYTES` and :data:`UNIT_BYTES` (psgs_w100's 13 GB on 64 CPUs: 52
    MB, 256 units); :data:`UNIT_BYTES` without Ray (the units are read one after another)."""
    import ray

    if not ray.is_initialized():
        return UNIT_BYTES
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return int(min(UNIT_BYTES, max(MIN_UNIT_BYTES, size / (4 * cpus))))


COLLECTION_FILE = re.compile(r"\.(tsv|jsonl)(\.(gz|bz2|xz))?$")  # what readers can read


def collection_files(spec: str, canonical: bool = False) -> list[str]:
    """The files of the collection ``spec``: the file itself, or a folder's files by name
    (each a ``.tsv`` or ``.jsonl`` file, ``.jsonl`` only for a ``canonical`` corpus, maybe
    gzip, bz2 or xz; hidden ones skipped; another file or a subfolder is an error)."""
    fs, p = storage.url_to_fs(spec)
    if not fs.exists(p):
        raise MissingInputError(f"{spec}: input file not found")
    if not fs.isdir(p):
        return [spec]
    fs.invalidate_cache(p)
    names = []
    for e in fs.ls(p, detail=True):
        name = e["name"].rstrip("/")
        if name == p.rstrip("/") or e["name"].endswith("/") and e.get("size", 0) == 0:
            continue  # the folder itself (an S3 folder-marker object)
        base = posixpath.basename(name)
        if base.startswith("."):
            continue
        if e["type"] == "directory" or not fs.isfile(name):
            raise DataError(f"{spec}: {base} is a folder: a folder collection holds files "
                            "only (.tsv, .jsonl)")
        if canonical and not readers.JSONL_FILE.search(base):
            raise DataError(f"{spec}: {base} is not a JSONL file (a folder of canonical "
                            "corpus rows holds .jsonl files only, plain or gzip, bz2 or xz)")
        if not COLLECTION_FILE.search(base):
            raise DataError(f"{spec}: {base} is not a passage collection file (a folder "
                            "collection holds .tsv and .jsonl files only, plain or gzip, "
                            "bz2 or xz)")
        names.append(base)
    if not names:
        raise DataError(f"{spec}: no passage collection file (.tsv, .jsonl) in the folder")
    return [storage.join(spec, n) for n in sorted(names)]


def _probe(path: str, sample: bool, jsonl: bool) -> tuple[list[str] | None, int, float]:
    """A file's TSV columns (of its first row, as iter_passages finds it; none for a
    ``jsonl`` file), the end of that line, and (``sample``) its lines per byte in the first
    MiB."""
    columns, body = None, 0
    span = readers.Span()
    lines = readers._open_text_lines(path, readers.Rejects("skip"), span=span)
    for _, line in lines:
        if not line.strip() and "\t" not in line:
            continue
        if not jsonl:
            try:
                cells = readers.tsv_cells(line)
            except csv.Error:
                continue  # a rejected line
            columns = readers.tsv_header(cells) or TSV_COLUMNS
        body = span.pos
        break
    for _ in lines if sample else ():
        if span.pos >= 1 << 20:
            break
    lines.close()
    return columns, body, max(1, span.lines) / max(1, span.pos)


def plan(paths: list[str], unit_bytes: int | None = None, jsonl: bool = False
         ) -> tuple[list[Unit], list[list[str] | None], int]:
    """``(units, columns, buckets)`` of the collection's files ``paths`` (as
    :func:`collection_files` gives them; all JSONL with ``jsonl``, else by name): their byte
    ranges of
    ``unit_bytes`` (:func:`unit_bytes_for` by default; one for a compressed or small file; a
    TSV's header line always in its file's first), each cut TSV file's columns, and the id
    buckets for the ids the files likely hold (the lines per byte of the first file's first
    MiB, times the bytes of text: a compressed file's x 4)."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = [fs.size(p) for fs, p in map(storage.url_to_fs, paths)]  # collection_files'
    compressed = [infer_compression(path) is not None for path in paths]
    total = sum(s * (4 if c else 1) for s, c in zip(sizes, compressed, strict=True))
    unit_bytes = unit_bytes or unit_bytes_for(total)

    def cut_at(ub: int) -> list[int]:
        return [i for i, (s, c) in enumerate(zip(sizes, compressed, strict=True))
                if not c and s > ub]

    while len(paths) + sum(-(-sizes[i] // unit_bytes) - 1 for i in cut_at(unit_bytes)) > \
            MAX_UNITS and cut_at(unit_bytes):
        unit_bytes *= 2  # fewer, larger ranges: their names keep 5 digits
    if len(paths) > MAX_UNITS:
        raise ConfigError(f"{len(paths):,} files in the collection: at most {MAX_UNITS:,} "
                          "(merge small files)")
    cut = cut_at(unit_bytes)
    is_jsonl = [jsonl or _is_jsonl(p) for p in paths]
    probed = sorted({0, *(i for i in cut if not is_jsonl[i])})  # a TSV's header
    with ThreadPoolExecutor(min(16, len(probed))) as pool:  # a first line each: on S3
        probes = dict(zip(probed, pool.map(_probe, [paths[i] for i in probed],
                                           [i == 0 for i in probed],
                                           [is_jsonl[i] for i in probed]), strict=True))
    buckets = min(MAX_BUCKETS, max(1, math.ceil(total * probes[0][2] / BUCKET_IDS)))
    units: list[Unit] = []
    columns: list[list[str] | None] = [None] * len(paths)
    for f, size in enumerate(sizes):
        if f not in cut:
            units.append(Unit(len(units), f, 0, None))
            continue
        columns[f], body, _ = probes.get(f, (None, 0, 0.0))  # JSONL: no header
        starts = sorted({0, *(max(i * unit_bytes, body)
                              for i in range(1, -(-size // unit_bytes)))})
        starts = [s for s in starts if s < size]
        for a, b in zip(starts, [*starts[1:], None], strict=True):
            units.append(Unit(len(units), f, a, b))
    return units, columns, buckets


class _Ids:
    """A unit's passage ids ``(key, seq, line, field, h)``, ``h`` the id's crc32 (and, with
    ``job.digests``, a :func:`~qgscale.data.readers.passage_digest` of each row that
    ``job.named_h`` may name, from the text :meth:`row` adds; 0 for the others, which nothing
    compares): packed into Arrow every :data:`PACK_ROWS` (about 30 bytes an id), written
    by bucket (``h`` modulo the buckets) to ``ids-<plan>/b<bucket>/<unit>-<part>.parquet``
    every :data:`ID_FLUSH` ids and at the end, counted per bucket."""

    def __init__(self, job: Job, unit: Unit):
        self.job, self.unit = job, unit
        self.keys: list[str] = []
        self.lines: list[int] = []
        self.flds: list[str] = []
        self.texts: list[tuple[str, str]] = []  # with job.digests: each row's title, text
        self.packed: list[pa.Table] = []
        self.held = 0  # ids packed
        self.seq = 0  # ids packed or written
        self.parts = 0
        self.counts = [0] * job.buckets  # ids written per bucket

    def add(self, key: str, line: int, fld: str) -> None:
        self.keys.append(key)
        self.lines.append(line)
        self.flds.append(fld)

    def row(self, row: dict[str, Any]) -> None:
        """The row whose id was added last: its text (``job.digests``); packs when due."""
        if self.job.digests:
            self.texts.append((row["title"], row["text"]))
        if len(self.keys) >= PACK_ROWS:
            self._pack()
            if self.held >= ID_FLUSH:
                self.flush()

    def _pack(self) -> None:
        n = len(self.keys)
        if not n:
            return
        h = crc32s(self.keys)
        digest = np.zeros(n if self.job.digests else 0, np.uint64)
        named = self.job.named_h
        if digest.size and named is not None and named.size:  # a named passage's row (or
            at = np.minimum(np.searchsorted(named, h), named.size - 1)  # a crc32 twin's)
            for j in np.flatnonzero(named[at] == h):
                digest[j] = readers.passage_digest(*self.texts[j])
        self.packed.append(pa.table({
            "key": pa.array(self.keys, pa.string()),
            "seq": pa.array(np.arange(self.seq, self.seq + n, dtype=np.int64)),
            "line": pa.array(self.lines, pa.int64()),
            "fld": pa.array(self.flds, pa.string()).dictionary_encode(),
            "h": pa.array(h),
            **({"digest": pa.array(digest)} if self.job.digests else {})}))
        self.keys, self.lines, self.flds, self.texts = [], [], [], []
        self.seq += n
        self.held += n

    def flush(self) -> None:
        self._pack()
        if not self.packed:
            return
        t = pa.concat_tables(self.packed, promote_options="permissive")
        self.packed, self.held = [], 0
        name = f"{self.unit.name}-{self.parts:04d}.parquet"
        for b, n in _write_buckets(t, self.job.buckets,
                                   lambda b: storage.join(bucket_uri(self.job, b), name)):
            self.counts[b] += n
        self.parts += 1


def _write_buckets(t: pa.Table, buckets: int, uri: Callable[[int], str]
                   ) -> list[tuple[int, int]]:
    """Write ``t``'s rows by bucket (column ``h`` modulo ``buckets``), bucket ``b``'s to
    ``uri(b)``; returns ``(bucket, rows)`` of each written."""
    b = t.column("h").to_numpy() % buckets
    order = np.argsort(b, kind="stable")
    t, b = t.take(pa.array(order)), b[order]
    cuts = np.flatnonzero(np.diff(b)) + 1
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, len(b)], strict=True):
        storage.write_parquet(uri(int(b[lo])), t.slice(lo, hi - lo))
        out.append((int(b[lo]), int(hi - lo)))
    return out


def unit_record(job: Job, unit: Unit) -> str:
    return storage.join(job.work_uri, "units", f"{unit.name}.json")


def ids_uri(job: Job) -> str:
    return storage.join(job.work_uri, f"ids-{job.plan_id}")


def bucket_uri(job: Job, bucket: int) -> str:
    return storage.join(ids_uri(job), f"b{bucket:04d}")


def read_unit(unit: Unit, job: Job) -> dict[str, Any]:
    """Read one unit into corpus shards and its ids; returns its record (written last, read
    back on a re-run of its plan): ``{name, plan, lines, read, header, rows, shards: [{name,
    rows}], ids: [per bucket], rejects}``, or ``{name, failed: rejected row}`` (fail mode: nothing
    recorded)."""
    record_uri = unit_record(job, unit)
    if storage.exists(record_uri):
        record = storage.read_json(record_uri)
        if record.get("plan") == job.plan_id:  # not a task of an earlier plan's, run late
            return record
    rejects = _UnitRejects(job.fail)
    span = readers.Span(unit.start, unit.end)
    ids = _Ids(job, unit)
    writer = storage.ShardWriter(job.out_uri, job.config_hash)
    shards: list[dict[str, Any]] = []
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        if len(shards) == MAX_SHARDS:
            raise ConfigError(f"data.shard_rows={job.shard_rows}: a byte range of {path} "
                              f"would write over {MAX_SHARDS:,} shards; raise shard_rows")
        name = f"part-{unit.index:05d}-{len(shards):06d}"
        writer.write(name, pa.Table.from_pylist(chunk, schema=CORPUS))
        shards.append({"name": name, "rows": len(chunk)})

    path = job.paths[unit.file]
    rows = (readers.iter_canonical_jsonl(path, "corpus", rejects, unique=False, span=span,
                                         ids=ids.add) if job.canonical else
            readers.iter_passages(path, job.lang, rejects, unique=False, span=span,
                                  header=job.columns[unit.file] if unit.start else None,
                                  ids=ids.add))
    try:
        for row in rows:
            ids.row(row)
            chunk.append(row)
            if len(chunk) == job.shard_rows:
                flush()
                chunk = []
    except _Stop:
        return {"name": unit.name, "failed": rejects.rows[0]}
    if chunk:
        flush()
    ids.flush()
    record = {"name": unit.name, "plan": job.plan_id, "lines": span.lines, "read": span.rows,
              "header": span.header, "rows": sum(s["rows"] for s in shards),
              "shards": shards, "ids": ids.counts, "rejects": rejects.rows}
    storage.write_json(record_uri, record)
    return record


def check_bucket(item: tuple[int, int], job: Job) -> dict[str, Any]:
    """Check bucket ``item`` (its number, and the ids every unit wrote to it plus the named
    passages in it): ``dups``, the number of ids an earlier row had, ``first_dup``, the first
    of them in file order (``{key, unit, seq, line, fld, first_unit, first_line}``, with its
    first row); in skip mode all of them, as such rows, go to ``<work>/dups-<plan>/
    b<bucket>.parquet`` (:func:`dups_uri`), not to the caller; with a DPR file's named
    passages (``job.digests``, :func:`write_named`),
    ``missing`` (those the collection lacks), ``compared`` (those with text, at the first
    copy of their id) and ``other`` (those whose text differs; ``first_other``: the first in
    file order, ``[unit, seq, pid]``). A bucket of more than :data:`BUCKET_IDS` is checked in
    passes, each over one share of its hashes (all copies of an id share a hash), so that a
    pass holds about that many."""

    b, n = item
    files = storage.list_files(bucket_uri(job, b), ".parquet")
    units = [int(posixpath.basename(f).split("-")[0][1:]) for f in files]
    named_uri = named_part(job, b)
    named = storage.read_parquet(named_uri) if job.digests and storage.exists(named_uri) \
        else None
    passes = max(1, math.ceil(n / BUCKET_IDS))
    out: dict[str, Any] = {"dups": 0, "dup_rows": [], "missing": [], "compared": 0,
                           "other": 0, "first_other": None}  # dup_rows: Arrow tables

    def share(t: pa.Table, i: int) -> pa.Table:
        return t if passes == 1 else t.filter(pa.array(
            (t.column("h").to_numpy() // job.buckets) % passes == i))

    for i in range(passes):
        parts = [share(t, i) for t in _read_ahead(files, 16 if passes == 1 else 4)]
        tables = [t.append_column("unit", pa.array(np.full(len(t), u, np.int32)))
                  for u, t in zip(units, parts, strict=True)]
        _check(tables, None if named is None else share(named, i), job.fail, out)
        del parts, tables
        pa.default_memory_pool().release_unused()  # a pass's buffers, before the next one's
    rows = out.pop("dup_rows")
    dups = pa.concat_tables(rows) if rows else None
    out["first_dup"] = None
    if dups is not None and dups.num_rows:
        first = pc.sort_indices(dups, [("unit", "ascending"), ("seq", "ascending")])[0]
        out["first_dup"] = dups.slice(first.as_py(), 1).to_pylist()[0]
        if not job.fail:
            storage.write_parquet(storage.join(dups_uri(job), f"b{b:04d}.parquet"), dups)
    return out


def dups_uri(job: Job) -> str:
    """The duplicate rows the bucket check found (skip mode): kept, so that a re-run
    reports them again."""
    return storage.join(job.work_uri, f"dups-{job.plan_id}")


def _read_ahead(files: list[str], window: int) -> Iterator[pa.Table]:
    """The parquet ``files`` in order, ``window`` read at once (their round trips on S3
    overlap), no more held than the window, the one being consumed and the one before it."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(window, len(files)))) as pool:
        todo = iter(files)
        ahead = deque(pool.submit(storage.read_parquet, f)
                      for f in itertools.islice(todo, window))
        while ahead:
            t = ahead.popleft().result()
            ahead.extend(pool.submit(storage.read_parquet, f) for f in itertools.islice(todo, 1))
            yield t
            del t


def _check(tables: list[pa.Table], named: pa.Table | None, first_only: bool,
           out: dict[str, Any]) -> None:
    """One pass of :func:`check_bucket`, added to ``out``."""
    t = pa.concat_tables(tables, promote_options="permissive") if tables else None
    if t is None or t.num_rows == 0:
        if named is not None:
            out["missing"] += named.column("pid").to_pylist()
        return
    order = pc.sort_indices(t, [("key", "ascending"), ("unit", "ascending"),
                                ("seq", "ascending")])
    at = order.to_numpy()
    keys = t.column("key").take(order)  # the other columns only where needed
    same = np.concatenate([[False], pc.equal(keys.slice(1), keys.slice(0, t.num_rows - 1))
                           .to_numpy(zero_copy_only=False)])
    starts = np.flatnonzero(~same)  # each id's first copy, in file order
    dup = np.flatnonzero(same)
    if dup.size:
        out["dups"] += int(dup.size)
        first = starts[np.searchsorted(starts, dup, side="right") - 1]
        if first_only:  # the first in file order: (unit, seq) least
            unit, seq = (t.column(c).to_numpy()[at[dup]] for c in ("unit", "seq"))
            k = np.lexsort((seq, unit))[0]
            dup, first = dup[k:k + 1], first[k:k + 1]
        rows = t.select(["key", "unit", "seq", "line"]).take(pa.array(at[dup]))
        firsts = t.select(["unit", "line"]).take(pa.array(at[first]))
        out["dup_rows"].append(rows.append_column(
            "fld", t.column("fld").take(pa.array(at[dup])).cast(pa.string())).append_column(
            "first_unit", firsts.column("unit")).append_column("first_line",
                                                               firsts.column("line")))
    if named is None or not named.num_rows:
        return
    pos = pc.index_in(named.column("pid"), value_set=keys.take(pa.array(starts))
                      .combine_chunks())
    hit = pos.is_valid()
    out["missing"] += named.column("pid").filter(pc.invert(hit)).to_pylist()
    found = named.filter(hit)
    rows = at[starts[pos.filter(hit).to_numpy()]]  # the first copy of each named passage
    want = found.column("digest").to_numpy()
    got = t.column("digest").to_numpy()[rows]
    text = want != 0  # named with their text
    other = np.flatnonzero(text & (want != got))
    out["compared"] += int(text.sum())
    out["other"] += int(other.size)
    if other.size:
        unit, seq = (t.column(c).to_numpy()[rows[other]] for c in ("unit", "seq"))
        k = np.lexsort((seq, unit))[0]
        cand = [int(unit[k]), int(seq[k]), found.column("pid")[int(other[k])].as_py()]
        out["first_other"] = min(out["first_other"] or cand, cand)


def named_part(job: Job, bucket: int) -> str:
    return storage.join(ids_uri(job), "named", f"b{bucket:04d}.parquet")


def write_named(job: Job, named: dict[str, int]) -> list[int]:
    """The passages a DPR file names (``pid -> passage_digest`` of its inline copy, 0 without
    text) by bucket, as :class:`_Ids` buckets the collection's ids; returns the counts."""
    counts = [0] * job.buckets
    if not named:
        return counts
    pids = pa.array(list(named), pa.string())
    h = crc32s(named)
    t = pa.table({"pid": pids, "digest": pa.array(np.fromiter(named.values(), np.uint64,
                                                              len(named))), "h": h})
    for b, n in _write_buckets(t, job.buckets, lambda b: named_part(job, b)):
        counts[b] = n
    return counts


def named_hashes(named: dict[str, int]) -> np.ndarray:
    """The sorted distinct crc32 of the named passages that have their text (digest != 0):
    the rows a unit digests (:class:`_Ids`); 4 bytes each, in the object store once."""
    return np.unique(crc32s(p for p, d in named.items() if d))


def crc32s(keys: Iterable[str]) -> np.ndarray:
    """Each id's crc32 (what buckets ids and selects the rows to digest)."""
    return np.fromiter((zlib.crc32(k.encode()) for k in keys), np.uint32)


def _job(paths: list[str], lang: str, out_uri: str, work_uri: str, config_hash: str,
         shard_rows: int, fail: bool, unit_bytes: int | None, digests: bool,
         canonical: bool, named_h: np.ndarray | None) -> tuple[list[Unit], Job]:
    """The plan of the files ``paths``: made once and kept in the work folder, so that a
    re-run reads the units its records name."""
    import hashlib

    plan_uri = storage.join(work_uri, "_plan.json")
    saved = storage.read_json(plan_uri) if storage.exists(plan_uri) else {}
    # the named passages the units digest: a unit read for another DPR file is not reused
    named = None if named_h is None else hashlib.sha256(named_h.tobytes()).hexdigest()[:16]
    if (saved.get("version"), saved.get("digests"), saved.get("named"), saved.get("fail"),
            saved.get("canonical", False), saved.get("paths")) != (
                PLAN_VERSION, digests, named, fail, canonical, paths):  # fail: what is kept
        # a fresh start: no shard of another plan (or of older code) is kept
        storage.remove(out_uri, recursive=True)
        storage.remove(work_uri, recursive=True)
        units, columns, buckets = plan(paths, unit_bytes, jsonl=canonical)
        saved = {"version": PLAN_VERSION, "id": uuid.uuid4().hex[:12], "digests": digests,
                 "named": named, "fail": fail, "canonical": canonical, "paths": paths,
                 "columns": columns, "buckets": buckets,
                 "units": [[u.index, u.file, u.start, u.end] for u in units]}
        storage.write_json(plan_uri, saved)
    return [Unit(*u) for u in saved["units"]], Job(
        paths, lang, out_uri, work_uri, config_hash, shard_rows, fail, saved["buckets"],
        saved["columns"], saved["id"], digests, named_h, canonical)


def write_collection(path: str, lang: str, out_uri: str, work_uri: str, config_hash: str,
                     shard_rows: int, rejects: readers.Rejects,
                     unit_bytes: int | None = None,
                     named: readers.NamedPassages | None = None,
                     canonical: bool = False) -> dict[str, Any]:
    """The collection ``path`` (a file, or a folder of them: :func:`collection_files`;
    language ``lang`` where a row has none) as corpus shards in ``out_uri``, in the files'
    order, read unit by unit (on Ray tasks where Ray is initialised and there are several
    units of ``unit_bytes``: :func:`unit_bytes_for` by default); returns the corpus
    manifest.

    Rejected rows go to ``rejects`` with their file (as given) and its line numbers; in fail
    mode the first raises. A file without rows fails, as in one stream. A duplicate id fails
    (fail mode: the first in file order) or is dropped from its shard
    (:func:`~qgscale.data.unique.drop_duplicates`), naming both rows. ``work_uri`` keeps the
    plan, the units' records and what the check found (the ids are removed once checked): a
    re-run of a finished collection reads those, and reports the same rejected rows; a unit
    whose shard is gone is read again. A new plan (no ``_plan.json`` of this code's version
    and ``named``) clears ``out_uri`` first. ``memory://`` paths (this process's own) are
    read here. ``named``: a DPR file over the collection, whose named passages are crossed
    off (:meth:`NamedPassages.crossed <qgscale.data.readers.NamedPassages.crossed>`) by the
    bucket check, before the duplicates are dropped. ``canonical``: the files hold canonical
    corpus rows (``--format jsonl --kind corpus``,
    :func:`~qgscale.data.readers.iter_canonical_jsonl`; each row has its language), not a
    passage collection's."""
    from qgscale.runtime import map_shards  # runtime -> config -> prepare -> here

    # tasks run elsewhere: a relative local path names the same file there (read from its
    # absolute path, reported as given)
    given = collection_files(path, canonical)
    paths = [os.path.abspath(u) if "://" not in u else u for u in given]
    shown = dict(zip(paths, given, strict=True))
    out_uri, work_uri = (os.path.abspath(u) if "://" not in u else u for u in (out_uri, work_uri))
    def as_given(e: DataError) -> DataError:  # a file's error names it as given
        msg = str(e)
        for p, g in shown.items():
            msg = msg.replace(p, g) if p != g else msg
        return DataError(msg)

    try:
        units, job = _job(paths, lang, out_uri, work_uri, config_hash, shard_rows,
                          rejects.mode != "skip", unit_bytes, named is not None, canonical,
                          None if named is None else named_hashes(named.named))
    except DataError as e:
        raise as_given(e) from None
    here = any(u.startswith("memory://") for u in (*paths, out_uri, work_uri))  # this process's

    def read(todo: list[Unit]) -> Iterator[dict[str, Any]]:
        return ((read_unit(u, job) for u in todo) if here else
                map_shards(read_unit, todo, job, num_cpus=1))

    records: list[dict[str, Any]] = []
    read_any: dict[int, bool] = {}  # file -> a unit of it read a row; header: a header line
    header: dict[int, bool] = {}

    def check_rows(files: Iterable[int]) -> None:  # every file has rows, as in one stream
        for f in files:
            if not read_any.get(f):
                raise readers.no_rows(shown[paths[f]], "only a header" if header.get(f)
                                      else "empty file")

    def add_rejects(rec: dict[str, Any], at: int) -> None:  # the unit's lines + the file's
        for r in rec.pop("rejects"):  # before it; not held here (Rejects may spill them)
            rejects.add({"file": shown.get(r["file"], r["file"]),
                         "line": r["line"] and r["line"] + at, "field": r["field"],
                         "reason": r["reason"], "raw": r["raw"]})

    lines = 0  # of the unit's file before it
    try:
        for unit, rec in zip(units, read(units), strict=True):
            if unit.start == 0:  # a file's first unit: the file before it is read
                check_rows(range(unit.file - 1, unit.file) if unit.file else ())
                lines = 0
            if "failed" in rec:
                r = rec["failed"]
                rejects.bad(shown.get(r["file"], r["file"]), r["line"] and r["line"] + lines,
                            r["field"], r["reason"], r["raw"])
            add_rejects(rec, lines)
            records.append(rec)
            lines += rec["lines"]
            read_any[unit.file] = read_any.get(unit.file, False) or rec["read"] > 0
            header[unit.file] = header.get(unit.file, False) or rec["header"]
    except DataError as e:
        raise as_given(e) from None
    check_rows(range(len(paths)))
    writer = storage.ShardWriter(out_uri, config_hash)
    have = writer.markers()
    lost = [i for i, r in enumerate(records) if any(s["name"] not in have for s in r["shards"])]
    if lost:  # a shard removed after its unit was read: that unit is read again
        log.warning("%s: %d corpus shard(s) gone since their units were read (e.g. unit %s): "
                    "read again", out_uri, len(lost), units[lost[0]].name)
        for i in lost:
            storage.remove(unit_record(job, units[i]))
        for i, rec in zip(lost, read([units[i] for i in lost]), strict=True):
            rec.pop("rejects")  # the same rows as its first read's, added then
            records[i] = rec
    line_at = [0] * len(units)  # lines of its file before each unit
    for i in range(1, len(units)):
        if units[i].start:
            line_at[i] = line_at[i - 1] + records[i - 1]["lines"]
    row_at = list(itertools.accumulate((r["rows"] for r in records[:-1]), initial=0))
    done_uri = storage.join(work_uri, "checked.json")  # kept: a re-run reports them again
    if not storage.exists(done_uri):
        counts = [sum(c) for c in zip(*(r["ids"] for r in records), strict=True)]
        if named is not None:
            counts = [a + b for a, b in zip(counts, write_named(job, named.named), strict=True)]
        buckets = [(b, n) for b, n in enumerate(counts) if n]
        checked = {"dups": 0, "first_dup": None, "missing": [], "compared": 0, "other": 0,
                   "first_other": None}
        for out in ((check_bucket(b, job) for b in buckets) if here else
                    map_shards(check_bucket, buckets, dataclasses.replace(job, named_h=None),
                               num_cpus=1, least=1)):
            for k in ("dups", "missing", "compared", "other"):
                checked[k] += out[k]
            if out["first_other"]:
                checked["first_other"] = min(checked["first_other"] or out["first_other"],
                                             out["first_other"])
            first = checked["first_dup"]
            if out["first_dup"] and (first is None or (out["first_dup"]["unit"],
                                                       out["first_dup"]["seq"]) <
                                     (first["unit"], first["seq"])):
                checked["first_dup"] = out["first_dup"]
        storage.write_json(done_uri, checked)
    checked = storage.read_json(done_uri)
    storage.remove(ids_uri(job), recursive=True)
    if named is not None:  # before the duplicates, as when the collection is one stream
        first = checked["first_other"]
        named.crossed(checked["missing"], checked["compared"], checked["other"],
                      first and first[2])
    def dup(d: dict[str, Any]) -> Dup:  # a duplicate row, its lines the file's
        return Dup(d["key"], row_at[d["unit"]] + d["seq"], shown[paths[units[d["unit"]].file]],
                   line_at[d["unit"]] + d["line"], d["fld"],
                   shown[paths[units[d["first_unit"]].file]],
                   line_at[d["first_unit"]] + d["first_line"])

    def reason(d: Dup) -> str:
        return duplicate_reason("passage id", d.key, d.file, d.first_file, d.first_line)

    if checked["first_dup"] and rejects.mode != "skip":  # the first in file order fails
        d = dup(checked["first_dup"])
        rejects.bad(d.file, d.line, d.fld, reason(d))
    elif checked["dups"]:  # each dropped from its shard, in file order
        found = storage.read_parquet(dups_uri(job))  # ~60 bytes a duplicate
        found = found.take(pc.sort_indices(found, [("unit", "ascending"), ("seq", "ascending")]))
        unit, seq = (found.column(c).to_numpy() for c in ("unit", "seq"))
        shard = seq // shard_rows  # a unit's shards hold shard_rows rows but its last
        cuts = [0, *(np.flatnonzero((np.diff(unit) != 0) | (np.diff(shard) != 0)) + 1),
                len(found)]
        groups = list(zip(cuts[:-1], cuts[1:], strict=True))
        drop_duplicates(writer, [(records[unit[a]]["shards"][shard[a]]["name"],
                                  (seq[a:b] % shard_rows).tolist()) for a, b in groups],
                        lambda i: [dup(d) for d in found.slice(
                            groups[i][0], groups[i][1] - groups[i][0]).to_pylist()],
                        reason, rejects)
    names = [s["name"] for r in records for s in r["shards"]]
    if not names:  # every row rejected: one empty shard, a readable table
        names = ["part-00000-000000"]
        writer.write(names[0], CORPUS.empty_table())
    return writer.finalize(names)
