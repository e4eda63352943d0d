"""Embedding shards read back as float32 matrices (no torch: the index's build, merge and
search processes import this, not the encoder)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qgscale import storage


def read_vectors(uri: str) -> tuple[list[str], np.ndarray]:
    """An embedding shard as ``(pids, float32 matrix)``."""
    table = storage.read_parquet(uri)
    return table.column("pid").to_pylist(), to_float32(table.column("vector"))


def iter_vectors(uri: str, rows: int = 16384) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """An embedding shard as ``(pids, float32 matrix)`` blocks of ``rows`` rows, streamed
    from the file: one block is held, as stored and in float32."""
    for batch in iter_batches(uri, rows):
        yield batch.column("pid"), to_float32(batch.column("vector"))


def iter_batches(uri: str, rows: int = 16384) -> Iterator[pa.RecordBatch]:
    """An embedding shard's record batches of ``rows`` rows (``pid``, ``vector``, and
    ``lang`` where written), streamed from the file (``iter_batches``)."""
    fs, path = storage.url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=rows)
    except (pa.ArrowInvalid, OSError) as e:
        raise OSError(f"{uri}: unreadable embedding shard: {e}") from e


def to_float32(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``vector`` column as a float32 matrix."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = col.type.list_size
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.ascontiguousarray(vecs, dtype=np.float32)
