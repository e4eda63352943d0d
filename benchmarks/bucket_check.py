"""Peak memory of prepare's passage-id check for one bucket (``collection.check_bucket``) as
the bucket grows: it holds a bucket's ids at once up to ``BUCKET_IDS`` (8M), and a fuller
bucket (the estimate from the first MiB missed) in passes over shares of the hash.

For each size N (``--ids``) a bucket is written as prepare's byte ranges write it
(``ids-<plan>/b0000/u<unit>-0000.parquet``, 1M ids a unit, ``key, seq, line, fld, h``;
pids ``p<i>``, every 1,000th a copy of an earlier one) and checked in a child process whose
RSS is sampled from outside (psutil, every 0.1 s); the child's RSS after its imports (N = 0)
is the baseline. The duplicates found must be the ones written.

    python benchmarks/bucket_check.py [--ids 1000000,4000000,8000000,16000000,32000000]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save  # noqa: E402

UNIT_IDS = 1_000_000


def job(folder: str, n: int):
    from qgscale.data import collection

    return collection.Job([f"{folder}/c.tsv"], "en", f"{folder}/corpus", f"{folder}/w", "h",
                          1000, False, 1, [None], f"n{n}")


def write_bucket(folder: Path, n: int) -> int:
    """The bucket of ``n`` ids; returns the duplicates written."""
    import pyarrow as pa

    from qgscale import storage
    from qgscale.data import collection

    j = job(str(folder), n)
    dups = 0
    for u, start in enumerate(range(0, n, UNIT_IDS)):
        idx = np.arange(start, min(n, start + UNIT_IDS))
        src = np.where(idx % 1000 == 999, idx - 500, idx)  # a copy of an earlier id
        dups += int((src != idx).sum())
        keys = [f"p{i}" for i in src]
        t = pa.table({"key": pa.array(keys, pa.string()),
                      "seq": pa.array(idx - start, pa.int64()),
                      "line": pa.array(idx - start + 1, pa.int64()),
                      "fld": pa.array(["id"] * len(idx)).dictionary_encode(),
                      "h": pa.array(np.fromiter((zlib.crc32(k.encode()) for k in keys),
                                                np.uint32, len(keys)))})
        storage.write_parquet(storage.join(collection.bucket_uri(j, 0),
                                           f"u{u:05d}-0000.parquet"), t)
    return dups


def child(phase: str, data: str, out: str) -> None:
    from qgscale.data import collection

    n, bucket_ids = map(int, phase.split(":"))
    collection.BUCKET_IDS = bucket_ids
    t0 = time.perf_counter()
    found = collection.check_bucket((0, n), job(data, n))["dups"] if n else 0
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "dups": found,
                      "passes": max(1, -(-n // collection.BUCKET_IDS))}))


def main() -> None:
    ap = parser(__doc__, "bucket_check.json")
    ap.add_argument("--ids", default="1000000,4000000,8000000,16000000,32000000")
    ap.add_argument("--bucket-ids", type=int, default=8 << 20,
                    help="ids a pass may hold (prepare's BUCKET_IDS)")
    args = parse(ap, child)
    script = str(Path(__file__).resolve())
    runs = []
    for n in [0, *map(int, args.ids.split(","))]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            written = write_bucket(Path(tmp), n) if n else 0
            made = time.perf_counter() - t0
            res = measure(REPO, f"{n}:{args.bucket_ids}", Path(tmp), Path(tmp) / "out",
                          script)
        res.update(ids=n, dups_written=written, made_s=round(made, 1))
        if res["dups"] != written:
            raise SystemExit(f"{n} ids: {res['dups']} duplicates found, {written} written")
        runs.append(res)
        print(json.dumps(res), flush=True)
    base = runs[0]["driver_peak_rss_mb"]
    print(f"\ncommit {commit(REPO)}; BUCKET_IDS {args.bucket_ids:,}\n")
    print("| ids in the bucket | passes | check s | peak RSS MB | over the imports MB | "
          "B per id |")
    print("|---|---|---|---|---|---|")
    for r in runs[1:]:
        over = r["driver_peak_rss_mb"] - base
        print(f"| {r['ids']:,} | {r['passes']} | {r['seconds']} | {r['driver_peak_rss_mb']} | "
              f"{over:.0f} | {over * (1 << 20) / r['ids']:.0f} |")
    save(args.out, {"commit": commit(REPO), "bucket_ids": args.bucket_ids, "unit_ids": UNIT_IDS,
                    "imports_rss_mb": base, "runs": runs})


if __name__ == "__main__":
    main()
