"""Deterministic training data order and the workers' prefetching input pipeline.

The order of the training rows is a function of ``(seed, epoch, global sample index)`` only,
not of which worker read what, so that a resumed run sees the rows an uninterrupted run
would have seen, and a run resumed on another number of workers goes on where the global
sample stream stopped:

- epoch ``e`` visits the parquet shards in a seeded order (``seed, e``) and the rows of each
  shard in a seeded order (``seed, e, shard``): sample ``g`` of the epoch is one row;
- one optimizer step consumes ``world x batch_size x grad_accum`` consecutive samples; micro
  batch ``j`` of worker ``r`` is samples ``[(j * world + r) * batch_size, ... + batch_size)``
  of the epoch (the samples of an epoch's last, incomplete step are dropped);
- the checkpoint records ``(epoch, offset)``: the samples of the epoch consumed so far.

:class:`Loader` reads a worker's micro-batches from the shards (one shard at a time, as the
order is shard-major, and of it only the rows this worker takes in the epoch: about
1/world of it, read row group by row group) and tokenises them with the task's collator; with
``prefetch`` > 0 a background thread does both ahead of the training step (HF tokenizers
release the GIL), ``prefetch`` = 0 collates inside the step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from qgscale import storage


@dataclass(frozen=True)
class Shard:
    """One parquet file of training rows."""

    uri: str
    rows: int


def list_shards(rows_uri: str) -> tuple[Shard, ...]:
    """The parquet shards under ``rows_uri`` with their row counts (from the footers)."""
    import pyarrow.parquet as pq

    out = []
    for uri in storage.list_files(rows_uri, ".parquet"):
        fs, path = storage.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            out.append(Shard(uri, pq.ParquetFile(f).metadata.num_rows))
    return tuple(out)


class EpochOrder:
    """The global row ids (shard start + row) in the order of epoch ``epoch``, built lazily:
    the shard permutation, the sample where each visited shard ends, and the rows of one
    shard at a time (not the whole order: 8 bytes a training row, in every worker)."""

    def __init__(self, shards: tuple[Shard, ...], seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch
        self.rows = np.array([s.rows for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.rows)])  # row id of shard i's row 0
        self.visit = np.random.default_rng([seed, epoch]).permutation(len(shards))
        self.ends = np.cumsum(self.rows[self.visit])  # sample after the k-th visited shard
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, i: int) -> np.ndarray:
        """Shard ``i``'s row ids in the epoch's order."""
        if self._cached is None or self._cached[0] != i:
            rows = np.random.default_rng([self.seed, self.epoch, i]).permutation(self.rows[i])
            self._cached = (i, self.starts[i] + rows)
        return self._cached[1]

    def take(self, start: int, stop: int) -> np.ndarray:
        """The row ids of samples ``[start, stop)`` of the epoch (clipped to its end)."""
        stop, parts = min(stop, len(self)), []
        while start < stop:
            k = int(np.searchsorted(self.ends, start, side="right"))
            i = int(self.visit[k])
            first = int(self.ends[k] - self.rows[i])  # the shard's first sample
            end = min(stop, int(self.ends[k]))
            parts.append(self._shard(i)[start - first:end - first])
            start = end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def epoch_order(shards: tuple[Shard, ...], seed: int, epoch: int) -> np.ndarray:
    """Global row ids (shard start + row) in the order of epoch ``epoch``, all of them."""
    order = EpochOrder(shards, seed, epoch)
    return order.take(0, len(order))


def sample_seed(seed: int, epoch: int, sample: int) -> int:
    """Seed of the random ops (dropout) of the micro-batch starting at ``sample``."""
    return int(np.random.SeedSequence([seed, epoch, sample]).generate_state(1)[0])


@dataclass(frozen=True)
class MicroBatch:
    """A collated micro-batch and where it is in the sample stream."""

    epoch: int
    sample: int  # index in the epoch of its first sample
    batch: Any


class ShardRows:
    """Rows by global id from the shards, one shard held at a time (the order is shard-major)
    and of it only the rows of ``wanted`` (sorted global ids: a worker's rows of an epoch,
    about 1/world of each shard, read row group by row group)."""

    def __init__(self, shards: tuple[Shard, ...], wanted: np.ndarray) -> None:
        self.shards, self.wanted = shards, wanted
        self.starts = np.cumsum([0] + [s.rows for s in shards])
        self._held: tuple[int, np.ndarray, pa.Table] | None = None

    def _shard(self, i: int) -> tuple[np.ndarray, pa.Table]:
        """Shard ``i``'s rows held: their sorted row numbers and the rows."""
        if self._held is None or self._held[0] != i:
            self._held = None  # the last shard's rows go before the next one's come
            lo, hi = self.starts[i], self.starts[i + 1]
            a, b = np.searchsorted(self.wanted, [lo, hi])
            rows = self.wanted[a:b] - lo
            self._held = (i, rows, storage.read_take(self.shards[i].uri, rows))
        return self._held[1], self._held[2]

    def __call__(self, ids: np.ndarray) -> dict[str, list]:
        """The rows with global ids ``ids``, in that order, as columns of Python lists."""
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        parts = []
        i = 0
        while i < len(ids):  # runs of the same shard
            j = i
            while j < len(ids) and shard[j] == shard[i]:
                j += 1
            s = int(shard[i])
            rows, table = self._shard(s)
            local = ids[i:j] - self.starts[s]
            pos = np.minimum(np.searchsorted(rows, local), max(len(rows) - 1, 0))
            if not np.array_equal(rows[pos] if len(rows) else rows, local):
                raise RuntimeError(f"{self.shards[s].uri}: rows asked that were not wanted")
            parts.append(table.take(pa.array(pos)))
            i = j
        return pa.concat_tables(parts).to_pydict()


class Loader:
    """One worker's micro-batches of an epoch, from a sample offset, collated.

    ``rank``/``world``: this worker and the worker count; ``batch_size`` rows per
    micro-batch; ``steps`` optimizer steps of ``grad_accum`` micro-batches each are read.
    """

    def __init__(self, shards: tuple[Shard, ...], seed: int, rank: int, world: int,
                 batch_size: int, collate: Callable[[dict[str, list]], Any],
                 prefetch: int = 2) -> None:
        self.shards, self.seed, self.rank, self.world = shards, seed, rank, world
        self.batch_size, self.collate, self.prefetch = batch_size, collate, prefetch

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def _raw(self, epoch: int, offset: int, micro_batches: int
             ) -> Iterator[tuple[int, dict[str, list]]]:
        order = EpochOrder(self.shards, self.seed, epoch)
        b, w = self.batch_size, self.world
        starts = [offset + (j * w + self.rank) * b for j in range(micro_batches)]
        ids = [order.take(start, start + b) for start in starts]  # 8 B a row of ours
        rows_of = ShardRows(self.shards, np.sort(np.concatenate(ids)) if ids else
                            np.zeros(0, np.int64))
        for start, batch in zip(starts, ids, strict=True):
            yield start, rows_of(batch)

    def epoch(self, epoch: int, offset: int, micro_batches: int) -> Iterator[MicroBatch]:
        """``micro_batches`` collated micro-batches of this worker in epoch ``epoch`` from
        sample ``offset`` (a step boundary). Close the iterator (or exhaust it) to stop the
        prefetching thread."""
        raw = self._raw(epoch, offset, micro_batches)
        if not self.prefetch:
            for start, rows in raw:
                yield MicroBatch(epoch, start, self.collate(rows))
            return
        yield from _prefetched(((s, r) for s, r in raw), self.collate, epoch, self.prefetch)


_END = object()


def _prefetched(raw: Iterator[tuple[int, dict[str, list]]], collate: Callable, epoch: int,
                depth: int) -> Iterator[MicroBatch]:
    """Read and collate ``raw`` in a background thread, ``depth`` micro-batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for start, rows in raw:
                if not put(MicroBatch(epoch, start, collate(rows))):
                    return
            put(_END)
        except BaseException as e:  # re-raised in the training thread
            put(e)

    thread = threading.Thread(target=work, name="qgscale-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(10)
