"""Duplicate ids of a written table: how they are reported, and dropping the later copies
from their shards (``skip``). A passage collection's ids are found by
:mod:`qgscale.data.collection` (bucket by bucket, on Ray tasks); a table read whole by
:class:`FirstSeen <qgscale.data.readers.FirstSeen>`. A duplicate names its own and the first
copy's file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa

from qgscale import storage
from qgscale.errors import DataError

if TYPE_CHECKING:
    from qgscale.data.readers import Rejects
    from qgscale.storage import ShardWriter


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


def drop_duplicates(writer: ShardWriter, items: list[tuple[str, list[int]]],
                    dups_of: Callable[[int], list[Dup]], reason: Callable[[Dup], str],
                    rejects: Rejects) -> int:
    """Drop duplicate rows from ``writer``'s shards: ``items``, each a shard name and the
    sorted offsets of its rows to drop, in stream order (:func:`drop_rows`, on Ray tasks
    where Ray is initialised and several shards have some), each row recorded in
    ``rejects`` (skip mode) with its :class:`Dup` (``dups_of(i)``: item ``i``'s, in its
    offsets' order, made when its shard is done) and its row as written. Returns the number
    dropped. Memory: the offsets, and a shard where rows are dropped from."""
    from qgscale.runtime import map_shards

    here = writer.root.startswith("memory://")  # this process's own store
    raws = ((drop_rows(i, writer) for i in items) if here else
            map_shards(drop_rows, items, writer, num_cpus=1))
    for i, shard_raws in enumerate(raws):
        for d, raw in zip(dups_of(i), shard_raws, strict=True):
            rejects.bad(d.file, d.line, d.fld, reason(d), raw)
    return sum(len(offsets) for _, offsets in items)


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
