"""A table found by a string key, built once and probed many times.

``pyarrow.compute.is_in`` and ``Table.join`` build a hash table of their value set on every
call, so a stage that probes each corpus shard against the passages it needs pays for all of
them per shard: O(needed) per shard, and O(shards x needed) in all (0.6 s a shard for 3M
needed pids; a 1B-passage corpus has 10k shards or more). :class:`KeyIndex` sorts the keys'
64-bit hashes once (:func:`~qgscale.data.pidfilter.key_hashes`); a probe hashes its own keys
and binary-searches them, O(probe x log n), then compares the keys it found exactly, so a
hash collision never makes a false match. Picklable: built on the driver and ``ray.put``
once, its arrays are read by the actors of a node from one shared copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale.data.pidfilter import Keys, key_hashes


@dataclass(frozen=True, eq=False)
class KeyIndex:
    """``table`` (any columns) in the order of its ``key`` column's hashes (``hashes``)."""

    table: pa.Table
    key: str
    hashes: np.ndarray  # uint64, ascending

    @classmethod
    def build(cls, table: pa.Table | Keys, key: str) -> KeyIndex:
        """The index of ``table`` by ``key`` (a bare key column is indexed as ``{key}``)."""
        if not isinstance(table, pa.Table):
            table = pa.table({key: table})
        h = key_hashes(table.column(key))
        order = np.argsort(h, kind="stable")
        return cls(table.take(pa.array(order)), key, h[order])

    @classmethod
    def of(cls, keys: KeyIndex | Keys | Iterable[str], key: str = "pid") -> KeyIndex:
        """``keys`` as an index: an index as it is, an Arrow column, or distinct strings."""
        if isinstance(keys, KeyIndex):
            return keys
        if not isinstance(keys, pa.Array | pa.ChunkedArray):
            keys = pa.array(list(set(keys)), pa.string())
        return cls.build(keys, key)

    def __len__(self) -> int:
        return self.table.num_rows

    def find(self, probe: Keys) -> tuple[np.ndarray, np.ndarray]:
        """Every match as ``(probe row, table row)`` (int64 arrays, by probe row): a key the
        table holds several times matches each of them."""
        if not len(probe) or not len(self):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        h = key_hashes(probe)
        lo = np.searchsorted(self.hashes, h, "left")
        n = np.searchsorted(self.hashes, h, "right") - lo  # candidates of each probe key
        rows = np.repeat(np.arange(len(h)), n)
        # the j-th candidate of a probe key is table row lo + j
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

    def values(self, probe: Keys, column: str) -> list[list]:
        """Each probe key's values of ``column``, one per table row of the key (in the table's
        order; none for a key the table lacks)."""
        rows, at = self.find(probe)
        out: list[list] = [[] for _ in range(len(probe))]
        for r, v in zip(rows.tolist(), self.table.column(column).take(pa.array(at)).to_pylist(),
                        strict=True):
            out[r].append(v)
        return out
