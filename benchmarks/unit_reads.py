"""What a work unit reads: its slice of a shard as the whole file sliced (before) vs only the
parquet row groups that hold its rows (``qgscale.storage.read_rows``).

A generation unit is a row range of one shard (``teacher.generate.shard_rows`` passages), a
scoring unit consecutive row ranges of the pair shards (``teacher.score.shard_pairs`` pairs).
With shards far larger than a unit (a 100k-row pair shard, 2,000-pair units) each unit used to
read the whole shard. This writes one pair shard of
``--rows`` rows (query + ~600-character passage, as the score join writes them) and reads every
unit both ways, timing it and counting the bytes read from the file (an fsspec file wrapper).

    python benchmarks/unit_reads.py --rows 100000 --unit 2000 --out bench-out/unit_reads.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import fsspec
import pyarrow as pa

from qgscale import storage


class Counting:
    """Bytes read through every file fsspec opens for reading (local files)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._open = fsspec.implementations.local.LocalFileSystem._open

    def __enter__(self) -> Counting:
        outer = self

        def _open(fs, path, mode="rb", **kw):
            f = outer._open(fs, path, mode, **kw)
            read = f.read

            def counted(*a):
                data = read(*a)
                outer.bytes += len(data)
                return data
            f.read = counted
            return f
        fsspec.implementations.local.LocalFileSystem._open = _open
        return self

    def __exit__(self, *exc) -> None:
        fsspec.implementations.local.LocalFileSystem._open = self._open


def pair_shard(path: str, rows: int) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    passages = [" ".join(rng.choices(words, k=100)) for _ in range(max(1, rows // 3))]
    storage.write_parquet(path, pa.table({
        "qid": [f"q{i // 8}" for i in range(rows)], "lang": ["de"] * rows,
        "query": [" ".join(rng.choices(words, k=8)) for _ in range(rows)],
        "pid": [f"p{i % len(passages)}" for i in range(rows)],
        "passage": [passages[i % len(passages)] for i in range(rows)]}))


def measure(path: str, rows: int, unit: int) -> dict[str, dict[str, float]]:
    ranges = [(a, min(a + unit, rows)) for a in range(0, rows, unit)]
    out = {}
    for name, read in (
            ("whole shard, sliced", lambda a, b: storage.read_parquet(path).slice(a, b - a)),
            ("its row groups (read_rows)", lambda a, b: storage.read_rows(path, a, b))):
        with Counting() as c:
            t0 = time.perf_counter()
            got = sum(read(a, b).num_rows for a, b in ranges)
            wall = time.perf_counter() - t0
        assert got == rows
        out[name] = {"units": len(ranges), "wall_s": round(wall, 3),
                     "mb_read": round(c.bytes / 2**20, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--unit", type=int, default=2000)
    ap.add_argument("--out", default="bench-out/unit_reads.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "part-00000.parquet")
        pair_shard(path, args.rows)
        size = Path(path).stat().st_size / 2**20
        res = measure(path, args.rows, args.unit)
    base, new = res["whole shard, sliced"], res["its row groups (read_rows)"]
    print(f"pair shard: {args.rows} rows, {size:.1f} MB on disk, units of {args.unit} rows, "
          f"row groups of {storage.ROW_GROUP_ROWS}")
    print("| read | units | wall s | MB read |\n|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['units']} | {r['wall_s']} | {r['mb_read']} |")
    ratio = {"wall": round(base["wall_s"] / max(new["wall_s"], 1e-9), 1),
             "bytes": round(base["mb_read"] / max(new["mb_read"], 1e-9), 1)}
    print(f"read_rows: {ratio['wall']}x less time, {ratio['bytes']}x fewer bytes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "rows": args.rows, "unit": args.unit, "row_group_rows": storage.ROW_GROUP_ROWS,
        "shard_mb": round(size, 1), "reads": res, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
