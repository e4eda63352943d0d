"""Reading a passage collection line by line from S3: s3fs's own ``readline`` against
qgscale's reader (``readers.iter_passages``: a 1 MiB ``io.BufferedReader`` over the s3fs
file, as every uncompressed remote text file is read).

A psgs_w100.tsv-style file of ``--passages`` passages is written to a local S3 endpoint
(moto server on 127.0.0.1); the baseline reads its first ``--baseline-lines`` lines with
``readline`` on the s3fs file (s3fs's ``readuntil`` reads, and copies, a whole block of
``default_block_size`` bytes for each line), the reader parses every passage. Prints a
table and writes JSON.

    python benchmarks/s3_lines.py [--passages 30000] [--baseline-lines 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=30_000)
    ap.add_argument("--baseline-lines", type=int, default=3_000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3_lines.json"))
    args = ap.parse_args()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[k] = "bench"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    import boto3
    import fsspec

    from qgscale import storage
    from qgscale.data import readers

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="qgs-lines")
    storage.configure(endpoint_url=f"http://{host}:{port}")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20_000)]
    data = "id\ttext\ttitle\n" + "".join(f"{i}\t{' '.join(rng.choices(words, k=100))}\tT{i}\n"
                                         for i in range(args.passages))
    uri = "s3://qgs-lines/psgs.tsv"
    storage.write_bytes(uri, data.encode())
    t0 = time.perf_counter()
    fs, path = fsspec.core.url_to_fs(uri)  # the filesystem the reader opens files with
    fs.info(path)  # its connection made before either is timed
    with fs.open(path, "rb") as f:  # the s3fs file, as the reader opened it before
        block = f.blocksize
        for n, _ in enumerate(iter(f.readline, b""), 1):
            if n == args.baseline_lines:
                break
    base = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    rows = sum(1 for _ in readers.iter_passages(uri, "en", unique=False))
    ours = (time.perf_counter() - t0) / rows
    server.stop()
    res = {"passages": args.passages, "mb": round(len(data) / (1 << 20), 1),
           "s3fs_block_bytes": block, "readline_us_per_line": round(base * 1e6, 1),
           "readline_lines": n, "reader_us_per_passage": round(ours * 1e6, 1),
           "reader_passages": rows, "speedup": round(base / ours, 1),
           "psgs_w100_hours_readline": round(base * 21_015_324 / 3600, 2),
           "psgs_w100_hours_reader": round(ours * 21_015_324 / 3600, 2)}
    print(f"\n{args.passages:,} passages ({res['mb']} MB) on a local S3 endpoint; s3fs block "
          f"{block:,} bytes\n")
    print("| read | lines | µs per line | psgs_w100 (21M lines), one process |")
    print("|---|---|---|---|")
    print(f"| s3fs readline | {n:,} | {res['readline_us_per_line']} | "
          f"{res['psgs_w100_hours_readline']} h |")
    print(f"| qgscale reader (parsed) | {rows:,} | {res['reader_us_per_passage']} | "
          f"{res['psgs_w100_hours_reader']} h |")
    print(f"\nspeedup {res['speedup']}x")
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
