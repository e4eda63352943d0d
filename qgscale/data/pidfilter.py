"""A Bloom filter of passage ids: the corpus rows a join needs, tested where they are read.

A Ray Data join of training pairs with the corpus shuffles both sides by pid. Unfiltered,
that is the whole corpus (about 650 GB of text at 1B passages) to find the few million
passages the training rows name. :class:`PidFilter` holds those pids in ``BITS_PER_PID``
bits each (1.25 bytes per counted pid: 39 MB for 31M), is built from their hashes streamed
to the driver (a chunk of hashes at a time, set straight into the packed bits), and is
tested by the corpus readers before the shuffle. No needed pid is ever
dropped; about 1% of the others pass (``HASHES`` hash functions), and the join drops them.

Hashes (:func:`key_hashes`, which :class:`~qgscale.data.keyindex.KeyIndex` uses too):
pandas' ``hash_array`` (SipHash with a fixed key: the same in every process), positions
``(h + i * h2) mod m`` with ``h2`` its odd upper half (Kirsch and Mitzenmacher; 64-bit
arithmetic, so filters past 2^32 bits still spread).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

BITS_PER_PID = 10
HASHES = 7
CHUNK = 1 << 20  # hashes set into the bits at a time (their positions: 56 MB)


Keys = pa.Array | pa.ChunkedArray


def key_hashes(keys: Keys) -> np.ndarray:
    """64-bit hashes (uint64) of a string column, ``CHUNK`` strings at a time (as Python
    objects: about 60 MB a chunk)."""
    import pandas as pd

    out = np.empty(len(keys), np.uint64)
    for i in range(0, len(keys), CHUNK):
        part = keys.slice(i, CHUNK).to_numpy(zero_copy_only=False)
        out[i:i + len(part)] = pd.util.hash_array(np.asarray(part, dtype=object),
                                                  categorize=False)
    return out


def pid_sum(pids: Keys) -> int:
    """The sum of the pids' :func:`key_hashes`, mod 2^64: the corpus rows a join found sum to
    its needed distinct pids' only if each was found once (a count alone lets one missing
    pid and another on two corpus rows cancel out)."""
    return int(np.sum(key_hashes(pids), dtype=np.uint64)) if len(pids) else 0


def _positions(h: np.ndarray, m: int) -> np.ndarray:
    """The ``HASHES`` bit positions (shape ``HASHES x len(h)``) of hashes ``h`` in ``m``."""
    h = np.asarray(h, dtype=np.uint64)
    h2 = (h >> np.uint64(32)) | np.uint64(1)
    i = np.arange(HASHES, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):  # mod 2^64, then mod m
        return (h[None, :] + i * h2[None, :]) % np.uint64(m)


@dataclass(frozen=True)
class PidFilter:
    """The bits of a Bloom filter (``bits``: little-endian packed, ``8 x len`` of them)."""

    bits: np.ndarray

    @classmethod
    def build(cls, n: int, hashes: Iterable[np.ndarray]) -> PidFilter:
        """A filter sized for ``n`` pids, holding every hash of ``hashes`` (:func:`key_hashes`
        of the pids, in as many arrays as they come; set ``CHUNK`` at a time)."""
        m = -(-max(64, int(n) * BITS_PER_PID) // 8) * 8  # whole bytes: m == self.m
        bits = np.zeros(m // 8, dtype=np.uint8)
        for h in hashes:
            for i in range(0, len(h), CHUNK):
                pos = _positions(h[i:i + CHUNK], m).ravel()
                np.bitwise_or.at(bits, pos >> np.uint64(3),
                                 np.left_shift(1, pos & np.uint64(7)).astype(np.uint8))
        return cls(bits)

    @property
    def m(self) -> int:
        return len(self.bits) * 8

    def contains(self, pids: Keys) -> np.ndarray:
        """Whether each pid may be one of the filter's (no false negatives)."""
        if not len(pids):
            return np.zeros(0, dtype=bool)
        pos = _positions(key_hashes(pids), self.m)
        hit = (self.bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=0)
