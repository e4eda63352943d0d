"""Embedding shards read back as float32 matrices (no torch: the index's build, merge and
search processes import this, not the encoder)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from qgscale import storage


def read_vectors(uri: str) -> tuple[list[str], np.ndarray]:
    """An embedding shard as ``(pids, float32 matrix)``."""
    table = storage.read_parquet(uri)
    return table.column("pid").to_pylist(), _float32(table.column("vector"))


def iter_vectors(uri: str, rows: int = 16384) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """An embedding shard as ``(pids, float32 matrix)`` blocks of ``rows`` rows: the shard is
    held as stored (fp16/fp32) and only one block in float32."""
    table = storage.read_parquet(uri)
    for start in range(0, table.num_rows, rows):
        block = table.slice(start, rows)
        yield block.column("pid").combine_chunks(), _float32(block.column("vector"))


def _float32(column: pa.ChunkedArray) -> np.ndarray:
    col = column.combine_chunks()
    dim = col.type.list_size
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.ascontiguousarray(vecs, dtype=np.float32)
