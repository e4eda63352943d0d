"""Id uniqueness of a streamed table in bounded memory.

:class:`FirstSeen <qgscale.data.readers.FirstSeen>` keeps every id read (about 100 bytes
each, 2 GB for 21M passages). :class:`SpilledIds` keeps only a run of ids: each full run is
sorted and written to a local temporary parquet file, and the duplicates are found at the
end by a k-way merge of the runs (memory O(runs x batch), runs merged ``fan_in`` at a time so
that no more than ``fan_in`` files are open). A duplicate names its own and the first copy's
file and line, as :class:`FirstSeen` does.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from qgscale import storage
from qgscale.errors import DataError

if TYPE_CHECKING:
    from qgscale.data.readers import Rejects
    from qgscale.storage import ShardWriter

_SORT = [("key", "ascending"), ("seq", "ascending")]


class Dup(NamedTuple):
    """A row whose id an earlier row had: ``seq`` is its position in the stream."""

    key: str
    seq: int
    file: str
    line: int | None
    fld: str | None
    first_file: str
    first_line: int | None


def duplicate_reason(what: str, key: object, file: str, first_file: str,
                     first_where: int | str | None) -> str:
    """``duplicate <what> <key> (first at line N)``; the first copy's file is named when it
    is another file than the duplicate's."""
    first = f"line {first_where}" if isinstance(first_where, int) else str(first_where)
    if first_file != file:
        first = (f"{first_file}:{first_where}" if isinstance(first_where, int)
                 else f"{first_file} {first_where}")
    return f"duplicate {what} {key!r} (first at {first})"


def _rows(path: str, batch_rows: int) -> Iterator[tuple]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, schema, strict=True)],
                                schema=schema)


class SpilledIds:
    """Records ``(id, file, line, field)`` of each streamed row (:meth:`add`, in stream
    order); :meth:`duplicates` yields every row whose id an earlier row had, in id order.
    Memory: ``run_rows`` ids while streaming, ``fan_in x batch_rows`` while merging the
    runs (written in row groups of ``batch_rows``), ``fan_in x 8,192`` while merging merged
    runs (more than ``fan_in x run_rows`` ids)."""

    def __init__(self, what: str = "id", run_rows: int = 20_000, fan_in: int = 64,
                 batch_rows: int = 1024):
        self.what = what
        self.run_rows, self.fan_in, self.batch_rows = run_rows, fan_in, batch_rows
        self.n = 0  # rows added
        self._dir = tempfile.mkdtemp(prefix="qgscale-ids-")
        self._files: dict[str, int] = {}
        self._flds: dict[str | None, int] = {}
        self._buf: tuple[list, list, list, list, list] = ([], [], [], [], [])
        self._runs: list[str] = []

    def add(self, key: str, file: str, line: int | None, fld: str | None) -> None:
        keys, seqs, files, lines, flds = self._buf
        keys.append(key)
        seqs.append(self.n)
        files.append(self._files.setdefault(file, len(self._files)))
        lines.append(line)
        flds.append(self._flds.setdefault(fld, len(self._flds)))
        self.n += 1
        if len(keys) >= self.run_rows:
            self._spill()

    def reason(self, d: Dup) -> str:
        return duplicate_reason(self.what, d.key, d.file, d.first_file, d.first_line)

    def _path(self) -> str:
        return os.path.join(self._dir, f"run-{len(self._runs):06d}.parquet")

    def _spill(self) -> None:
        keys, seqs, files, lines, flds = self._buf
        if not keys:
            return
        table = pa.table({"key": pa.array(keys, pa.string()), "seq": pa.array(seqs, pa.int64()),
                          "file": pa.array(files, pa.int32()),
                          "line": pa.array(lines, pa.int64()),
                          "fld": pa.array(flds, pa.int32())}).sort_by(_SORT)
        path = self._path()
        pq.write_table(table, path, row_group_size=self.batch_rows)  # what a merge reads
        self._runs.append(path)
        self._buf = ([], [], [], [], [])

    def _merge(self, paths: list[str]) -> Iterator[tuple]:
        return heapq.merge(*(_rows(p, self.batch_rows) for p in paths))

    def _compact(self) -> list[str]:
        """Merge runs ``fan_in`` at a time until at most ``fan_in`` are left."""
        runs = self._runs
        schema = pq.read_schema(runs[0]) if runs else None
        while len(runs) > self.fan_in:
            merged = []
            for i in range(0, len(runs), self.fan_in):
                group = runs[i:i + self.fan_in]
                path = self._path() + f".m{i}"
                with pq.ParquetWriter(path, schema) as out:
                    chunk: list[tuple] = []
                    for row in self._merge(group):
                        chunk.append(row)
                        if len(chunk) == 8192:
                            out.write_table(_table(chunk, schema))
                            chunk = []
                    if chunk:
                        out.write_table(_table(chunk, schema))
                for p in group:
                    os.remove(p)
                merged.append(path)
            runs = self._runs = merged
        return runs

    def duplicates(self) -> Iterator[Dup]:
        """Every row whose id an earlier row had (each names the first row), in id order."""
        self._spill()
        files = {i: f for f, i in self._files.items()}
        flds = {i: f for f, i in self._flds.items()}
        first: tuple | None = None
        for row in self._merge(self._compact()):
            if first is not None and row[0] == first[0]:
                yield Dup(row[0], row[1], files[row[2]], row[3], flds[row[4]],
                          files[first[2]], first[3])
            else:
                first = row

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SpilledIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop_duplicates(writer: ShardWriter, dups: Iterable[Dup],
                    locate: Callable[[int], tuple[str, int]], reason: Callable[[Dup], str],
                    rejects: Rejects) -> int:
    """The duplicates ``dups`` among the rows of ``writer``'s shards (``locate(seq)``: the
    shard name and row of stream position ``seq``): in ``fail`` mode the first one in the
    stream raises (``dups`` streamed); in ``skip`` mode each is recorded in ``rejects`` and
    dropped from its shard (:func:`drop_rows`, on Ray tasks where Ray is initialised and
    several shards have some). Returns the number dropped. Memory: O(duplicates) in skip
    mode, and one shard where it is dropped from."""
    from qgscale.runtime import map_shards

    if rejects.mode != "skip":
        first = min(dups, key=lambda d: d.seq, default=None)  # streamed: one held
        if first is not None:
            rejects.bad(first.file, first.line, first.fld, reason(first))
        return 0
    by_shard: dict[str, list[tuple[int, Dup]]] = {}  # in stream order
    for d in sorted(dups, key=lambda d: d.seq):
        name, at = locate(d.seq)
        by_shard.setdefault(name, []).append((at, d))
    work = list(by_shard.items())
    here = writer.root.startswith("memory://")  # this process's own store
    items = [(name, [at for at, _ in found]) for name, found in work]
    raws = ((drop_rows(i, writer) for i in items) if here else
            map_shards(drop_rows, items, writer, num_cpus=1))
    for (_, found), shard_raws in zip(work, raws, strict=True):
        for (_, d), raw in zip(found, shard_raws, strict=True):
            rejects.bad(d.file, d.line, d.fld, reason(d), raw)
    return sum(len(d) for d in by_shard.values())


def drop_rows(item: tuple[str, list[int]], writer: ShardWriter) -> list[str | None]:
    """Drop rows ``offsets`` (sorted) of ``writer``'s shard ``name`` (``item``); returns them
    as JSON (the rows as written). The shard's marker keeps them: a re-run (of a shard
    dropped from already) returns them as they were."""
    name, offsets = item
    marker = storage.read_json(writer.marker_uri(name))
    if marker.get("dropped") == offsets:
        return marker.get("dropped_raw") or [None] * len(offsets)
    table = storage.read_parquet(writer.shard_uri(name))
    if table.num_rows == marker["rows"] - len(offsets):
        # filtered by a run that died before its marker: mark it, do not filter again
        raws = marker.get("dropped_raw") if marker.get("dropping") == offsets else None
        raws = raws or [None] * len(offsets)
        writer.write(name, table, dropped=offsets, dropped_raw=raws)
        return raws
    if table.num_rows != marker["rows"]:
        raise DataError(f"{writer.shard_uri(name)}: {table.num_rows} rows, its marker says "
                        f"{marker['rows']}: remove {writer.root} and prepare again")
    raws = [json.dumps(table.slice(at, 1).to_pylist()[0], ensure_ascii=False)
            for at in offsets]
    # the rows first, so that a crash between the shard and its marker keeps them
    storage.write_json(writer.marker_uri(name), {**marker, "dropping": offsets,
                                                 "dropped_raw": raws})
    drop = set(offsets)
    keep = pa.array([j not in drop for j in range(table.num_rows)])
    writer.write(name, table.filter(keep), dropped=offsets, dropped_raw=raws)
    return raws
