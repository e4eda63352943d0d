"""Reading passages from a sharded corpus without holding the corpus.

Every stage that needs passage text needs a few of them (the positives, negatives and
candidates of its queries), so it collects their pids first and scans the corpus shards one at
a time, keeping only the matching rows (a semi-join: the pids indexed once by
:class:`~qgscale.data.keyindex.KeyIndex`, each shard's probed in O(shard x log pids)).
Memory: one shard plus the passages asked for, never the corpus; at 18M passages in shards
of 20k rows a stage holding 150k training passages peaks at about one shard (~15 MB) + 150k
texts (~100 MB).
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.keyindex import KeyIndex
from qgscale.data.pidfilter import Keys
from qgscale.data.schema import CORPUS, blank, passage_text
from qgscale.errors import DataError, MissingInputError
from qgscale.runtime import map_shards


def corpus_shards(corpus_uri: str) -> list[str]:
    """The corpus parquet shards (a folder of ``*.parquet``, or one file)."""
    fs, path = storage.url_to_fs(corpus_uri)
    if fs.isfile(path):
        return [corpus_uri]
    files = storage.list_files(corpus_uri, ".parquet")
    if not files:
        raise MissingInputError(f"{corpus_uri}: corpus not found (no parquet shards)")
    return files


def scan(corpus_uri: str, pids: Iterable[str] | Keys | KeyIndex | None,
         columns: tuple[str, ...] = ("pid", "lang", "title", "text"),
         cluster_window: bool = False) -> Iterator[pa.Table]:
    """Per corpus shard, in shard order, its rows whose pid is in ``pids`` (every row when
    None), with ``columns``: one shard's rows at a time in this process. With ``pids``, each
    shard's pid column is read first and its other columns only when some pid matches;
    ``pids`` are indexed once per call (:class:`~qgscale.data.keyindex.KeyIndex`; pass one to
    reuse it), so a shard costs O(shard x log pids). Empty pid or text is a DataError naming
    the shard and row.

    Where Ray is initialised and the corpus has several remote shards (or many local ones),
    each shard is read and filtered by a Ray task (:func:`qgscale.runtime.map_shards`: the
    filter goes where the shard is read, the tasks spread over the nodes and ask for no CPU,
    so that stages whose actors hold every CPU can still scan): only the matching rows come
    back, and the corpus is read at the cluster's bandwidth, not one shard after another
    (``cluster_window``: see :func:`~qgscale.runtime.map_shards`)."""
    wanted = None if pids is None else KeyIndex.of(pids)
    cols = list(dict.fromkeys(("pid", *columns)))
    uris = corpus_shards(corpus_uri)
    for t in map_shards(_scan_shard, uris, wanted, cols, list(columns),
                        cluster_window=cluster_window):
        if t is not None:
            yield t


def _scan_shard(uri: str, wanted: KeyIndex | None, cols: list[str], columns: list[str]
                ) -> pa.Table | None:
    """One shard's part of :func:`scan` (None: no row matches)."""
    if wanted is None:
        t, rows = storage.read_parquet(uri, cols), 0
    else:
        mask = wanted.contains(storage.read_parquet(uri, ["pid"]).column("pid"))
        if not mask.any():
            return None
        rows = pa.array(np.flatnonzero(mask))
        t = storage.read_parquet(uri, cols).take(rows)
    check(t, uri, rows)
    return t.select(columns)


def check(t: pa.Table, uri: str, rows: pa.Array | int = 0) -> None:
    """Empty pid / text: a DataError naming the shard and the row in the shard (``rows``: the
    shard rows of ``t``'s rows, or the shard row of its first)."""
    for field in ("pid", "text"):
        if field not in t.column_names:
            continue
        bad = blank(t.column(field))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            row = rows + i if isinstance(rows, int) else rows[i].as_py()
            raise DataError(f"{uri}: row {row} (pid={t.column('pid')[i].as_py()}): empty "
                            f"field {field!r}")


def read_rows(corpus_uri: str, pids: Iterable[str]) -> pa.Table:
    """The corpus rows of ``pids`` (those the corpus has), as one table."""
    parts = [t.cast(CORPUS) for t in scan(corpus_uri, pids)]
    return pa.concat_tables(parts) if parts else CORPUS.empty_table()


def iter_passages(corpus_uri: str, pids: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(pid, "title text")`` (the text the models read) of the ``pids`` the corpus has,
    one corpus shard in memory at a time."""
    for t in scan(corpus_uri, pids, ("pid", "title", "text")):
        yield from ((p, passage_text(a, b)) for p, a, b in zip(
            *(t.column(c).to_pylist() for c in ("pid", "title", "text")), strict=True))


def read_passages(corpus_uri: str, pids: Iterable[str]) -> dict[str, str]:
    """``pid -> "title text"`` for the ``pids`` the corpus has; the caller names the ones it
    lacks."""
    return dict(iter_passages(corpus_uri, pids))


SAMPLE_MARGIN = 6.0  # standard deviations of slack in how many keys fall below the threshold


def sample_pids(corpus_uri: str, k: int, seed: int) -> list[str]:
    """``k`` pids drawn uniformly without replacement (all if the corpus is smaller), in a
    seeded order: every row gets a random key (its shard's generator seeded by ``seed`` and
    the shard's file name) and the sample is the ``k`` smallest keys, so it depends only on
    ``seed`` and the corpus. Each shard's keys are drawn where its pid column is read
    (:func:`qgscale.runtime.map_shards`), and only the pids whose key is below a threshold
    come back: set from the corpus's row count (:func:`corpus_rows`) so that about ``k + 6
    sqrt(k)`` do; in the rare case of fewer than ``k``, another pass with the threshold of
    the counted rows, at least doubled (the sample is the same whatever the threshold). The
    caller receives O(k) pids, not the corpus's pid column (1B strings at 1B passages);
    memory O(k + shard)."""
    if k <= 0:
        return []
    uris = corpus_shards(corpus_uri)
    n = corpus_rows(corpus_uri, uris)
    below = _threshold(k, n)
    while True:
        parts = list(map_shards(_sample_shard, uris, seed, below))
        keys = np.concatenate([np.empty(0)] + [key for key, _, _ in parts])
        n = sum(rows for _, _, rows in parts)  # counted: a stale manifest costs one pass
        if len(keys) >= min(k, n) or below >= 1.0:
            break
        below = max(_threshold(k, n), min(1.0, 2 * below))
    pids = pa.chunked_array([p for _, p, _ in parts], pa.string()).combine_chunks()
    return pids.take(pa.array(np.argsort(keys, kind="stable")[:k])).to_pylist()


def _threshold(k: int, n: int) -> float:
    """The key below which about ``k + 6 sqrt(k) + 16`` of ``n`` uniform keys fall."""
    return 1.0 if k >= n else min(1.0, (k + SAMPLE_MARGIN * math.sqrt(k) + 16) / n)


def corpus_rows(corpus_uri: str, uris: list[str]) -> int:
    """The corpus's row count: from its ``_manifest.json`` when that lists exactly these
    shard files (``qgscale data prepare`` writes it), else from their parquet footers
    (:func:`qgscale.runtime.map_shards`)."""
    m = storage.read_manifest(corpus_uri) if uris != [corpus_uri] else None
    shards = m.get("shards") if isinstance(m, dict) else None
    listed = {s.get("file"): s.get("rows") for s in shards if isinstance(s, dict)} \
        if isinstance(shards, list) else {}
    if listed and set(listed) == {posixpath.basename(u) for u in uris} and all(
            isinstance(r, int) for r in listed.values()):
        return sum(listed.values())
    return sum(map_shards(_shard_rows, uris))


def _shard_rows(uri: str) -> int:
    return storage.footers([uri])[0].num_rows


def _sample_shard(uri: str, seed: int, below: float) -> tuple[np.ndarray, pa.Array, int]:
    """One shard's part of :func:`sample_pids`: its pids whose key is below ``below``, their
    keys and the shard's row count (an empty pid is a DataError naming the shard and row).
    The keys' generator is seeded by ``seed`` and a 128-bit hash of the file's name."""
    t = storage.read_parquet(uri, ["pid"])
    check(t, uri)
    name = hashlib.sha256(posixpath.basename(uri).encode()).digest()[:16]
    keys = np.random.default_rng([seed, int.from_bytes(name, "little")]).random(t.num_rows)
    keep = np.flatnonzero(keys < below)
    pids = pc.cast(t.column("pid").take(pa.array(keep)), pa.string()).combine_chunks()
    return keys[keep], pids, t.num_rows
