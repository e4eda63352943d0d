"""What one training worker holds of the row shards it reads (``qgscale.train.order``): the
whole shard table it takes its micro-batches from (before), or only its own rows of it, read
row group by row group (after).

    python benchmarks/train_reads.py --out benchmarks/results/train_reads.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): ``--shards`` parquet shards of ``--shard-rows`` training
rows, each a query and ``--passages`` passages of 100 words (``scale.word_list``: about
``--passages`` x 600 bytes a row, as distillation's rows carry their candidates' texts),
1,024-row groups as the stages write them. Per source tree, a child process runs worker 0
of ``--world`` through one epoch (``Loader.epoch``, micro-batches of 32, no prefetch thread,
the collator a row count) and checks it got its share of the rows; its peak RSS is sampled
from outside (``before_after.measure``), beside the RSS after its imports. Prints a table;
writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import commit, measure, parse, parser, save, trees  # noqa: E402

BATCH = 32


def child(phase: str, data: str, out: str) -> None:
    """Worker 0 of ``phase`` (the world size) through one epoch; prints its numbers."""
    import psutil

    from qgscale.train.order import Loader, list_shards

    world = int(phase)
    base = psutil.Process().memory_info().rss
    shards = list_shards(data)
    total = sum(s.rows for s in shards)
    steps = total // (world * BATCH)
    t0 = time.time()
    got = sum(mb.batch for mb in Loader(shards, 0, 0, world, BATCH, lambda r: len(r["id"]),
                                        0).epoch(0, 0, steps))
    assert got == steps * BATCH, f"{got} rows for {steps} micro-batches"
    print(json.dumps({"epoch_s": round(time.time() - t0, 2), "rows": got,
                      "after_imports_mb": round(base / 2**20, 1)}), flush=True)


def write_data(root: Path, shards: int, rows: int, passages: int) -> int:
    """The row shards; returns their bytes."""
    import pyarrow as pa
    from scale import word_list

    from qgscale import storage

    words, p = word_list()
    rng = np.random.default_rng(0)
    for i in range(shards):
        texts = [" ".join(words[rng.choice(len(words), 100, p=p)]) for _ in range(997)]
        table = pa.table({
            "id": np.arange(i * rows, (i + 1) * rows),
            "query": [f"query {j}" for j in range(rows)],
            "passages": [[texts[(j * 7 + k) % 997] + f" {j}" for k in range(passages)]
                         for j in range(rows)]})
        storage.write_parquet(str(root / f"part-{i:05d}.parquet"), table)
    return sum(f.stat().st_size for f in root.iterdir())


def main() -> None:
    ap = parser(__doc__, "train_reads.json")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--passages", type=int, default=10)
    ap.add_argument("--world", type=int, default=8)
    args = parse(ap, child)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-train-reads-") as tmp:
        data = Path(tmp) / "rows"
        data.mkdir()
        size = write_data(data, args.shards, args.shard_rows, args.passages)
        for name, src in trees(args.baseline_src):
            r = measure(src, str(args.world), data, Path(tmp) / name, __file__)
            rows.append({"tree": name, "commit": commit(src), **r})
            print(rows[-1], flush=True)
    print(f"\n{args.shards} shards x {args.shard_rows} rows ({size / 1e6:.0f} MB parquet), "
          f"worker 0 of {args.world}")
    print(f"{'tree':9} {'commit':8} {'epoch s':>8} {'imports MB':>11} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['epoch_s']:8.1f} {r['after_imports_mb']:11.1f} "
              f"{r['driver_peak_rss_mb']:12.1f}")
    result = {"shards": args.shards, "shard_rows": args.shard_rows,
              "passages": args.passages, "world": args.world, "parquet_mb": round(size / 1e6),
              "rows": rows, "load_avg_start": load, "load_avg_end": os.getloadavg()}
    if args.baseline_src:
        grow = [r["driver_peak_rss_mb"] - r["after_imports_mb"] for r in rows]
        result["held_mb"] = {"before": round(grow[0], 1), "after": round(grow[-1], 1)}
        print("held above imports, MB:", result["held_mb"])
    save(args.out, result)


if __name__ == "__main__":
    main()
