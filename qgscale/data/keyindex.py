"""A table found by a string key, built once and probed many times.

``pyarrow.compute.is_in`` and ``Table.join`` build a hash table of their value set on every
call, so a stage that probes each corpus shard against the passages it needs pays for all of
them per shard: O(needed) per shard, and O(shards x needed) in all (0.6 s a shard for 3M
needed pids; a 1B-passage corpus has 10k shards or more). :class:`KeyIndex` sorts the keys'
64-bit hashes once (:func:`~qgscale.data.pidfilter.pid_hashes`); a probe hashes its own keys
and binary-searches them, O(probe x log n), then compares the keys it found exactly, so a
hash collision never makes a false match. Picklable: built on the driver and ``ray.put``
once, its arrays are read by the actors of a node from one shared copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale.data.pidfilter import pid_hashes

Keys = pa.Array | pa.ChunkedArray


@dataclass(frozen=True)
class KeyIndex:
    """``table`` (any columns) in the order of its ``key`` column's hashes (``hashes``)."""

    table: pa.Table
    key: str
    hashes: np.ndarray  # uint64, ascending

    @classmethod
    def build(cls, table: pa.Table | Keys, key: str = "key") -> KeyIndex:
        """The index of ``table`` by ``key`` (a bare key column is indexed as ``{key}``)."""
        if not isinstance(table, pa.Table):
            table = pa.table({key: table})
        h = pid_hashes(table.column(key)) if table.num_rows else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")
        return cls(table.take(pa.array(order)).combine_chunks(), key, h[order])

    def __len__(self) -> int:
        return self.table.num_rows

    def find(self, probe: Keys) -> tuple[np.ndarray, np.ndarray]:
        """Every match as ``(probe row, table row)`` (int64 arrays, by probe row): a key the
        table holds several times matches each of them."""
        if not len(probe) or not len(self):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h = pid_hashes(probe)
        lo = np.searchsorted(self.hashes, h, "left")
        n = np.searchsorted(self.hashes, h, "right") - lo
        rows = np.repeat(np.arange(len(h)), n)
        at = np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
        if not len(rows):
            return rows, at
        same = pc.fill_null(pc.equal(probe.take(pa.array(rows)), self.table.column(
            self.key).take(pa.array(at))), False)  # a null key matches nothing
        same = same.to_numpy(zero_copy_only=False).astype(bool)
        return rows[same], at[same]

    def contains(self, probe: Keys) -> np.ndarray:
        """Whether each probe key is in the table (bool array)."""
        mask = np.zeros(len(probe), dtype=bool)
        mask[self.find(probe)[0]] = True
        return mask
