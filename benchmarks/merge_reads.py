"""An index merge task's reads of its parts from S3 (``qgscale.index.build.merge_parts``),
before and after the parts are downloaded ahead of the merge (``local_parts``: 4 ahead)
instead of one after another.

    python benchmarks/merge_reads.py --out benchmarks/results/merge_reads.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): a trained ``IVF64,Flat`` index and ``--parts`` parts of
``--part-rows`` random 128-d vectors (about 0.5 KB a vector in the part file), in a bucket of
a moto S3 server over HTTP on 127.0.0.1 (started here), read through a proxy here that holds
each request ``--latency-ms`` and paces each connection's replies to ``--stream-mbps`` MB/s
(one S3 GET stream's rate; S3's aggregate over many streams is far higher, but this
machine's 2 CPUs serve moto, the proxy and the merge, so the speed-up here is bounded by
them). Per source tree, a child process merges the parts in memory into a local file
(``memory`` mode) and checks the vector count; its wall time and peak RSS are measured from
outside (``before_after.measure``). Prints a table; writes JSON.
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
from corpus_scan import latency_proxy, s3_server  # noqa: E402

DIM, NLIST = 128, 64


def child(phase: str, data: str, out: str) -> None:
    """Merge the parts named in ``data/parts.json`` through the slow endpoint; prints the
    time."""
    from qgscale.index.build import merge_parts

    os.environ["AWS_ENDPOINT_URL"] = os.environ["BENCH_SLOW_ENDPOINT"]
    spec = json.loads(Path(data, "parts.json").read_text())
    Path(out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n = merge_parts(spec["trained"], spec["parts"], str(Path(out) / "shard.faiss"), "memory", 2)
    wall = round(time.time() - t0, 2)
    assert n == spec["rows"], f"merged {n} != {spec['rows']} vectors"
    print(json.dumps({"merge_s": wall, "ntotal": n}), flush=True)


def write_parts(bucket: str, parts: int, rows: int) -> dict:
    """A trained index and ``parts`` parts (quantizer stripped, as the add step writes
    them) in the bucket."""
    import faiss

    from qgscale.index.build import strip_quantizer, write_index

    rng = np.random.default_rng(0)
    trained = faiss.index_factory(DIM, f"IVF{NLIST},Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(rng.normal(size=(40 * NLIST, DIM)).astype(np.float32))
    write_index(trained, f"{bucket}/trained.faiss")
    uris = []
    for i in range(parts):
        part = faiss.clone_index(trained)
        part.add_with_ids(rng.normal(size=(rows, DIM)).astype(np.float32),
                          np.arange(i * rows, (i + 1) * rows))
        strip_quantizer(part)
        uris.append(f"{bucket}/parts/part-{i:05d}.faiss")
        write_index(part, uris[-1])
    return {"trained": f"{bucket}/trained.faiss", "parts": uris, "rows": parts * rows}


def main() -> None:
    ap = parser(__doc__, "merge_reads.json")
    ap.add_argument("--parts", type=int, default=24)
    ap.add_argument("--part-rows", type=int, default=40_000)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--stream-mbps", type=float, default=40.0,
                    help="MB/s of one connection's replies")
    args = parse(ap, child)
    proc, bucket = s3_server()
    os.environ["BENCH_SLOW_ENDPOINT"] = latency_proxy(
        os.environ["AWS_ENDPOINT_URL"], args.latency_ms / 1000, args.stream_mbps * 1e6)
    rows, load = [], os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="qgs-merge-bench-") as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            spec = write_parts(bucket, args.parts, args.part_rows)
            (data / "parts.json").write_text(json.dumps(spec))
            for name, src in trees(args.baseline_src):
                r = measure(src, "s3", data, Path(tmp) / name, __file__)
                rows.append({"tree": name, "commit": commit(src), **r})
                print(rows[-1], flush=True)
    finally:
        proc.terminate()
    part_mb = args.part_rows * (DIM * 4 + 8) / 1e6
    print(f"\n{args.parts} parts of {part_mb:.1f} MB, {args.latency_ms:g} ms a request, "
          f"{args.stream_mbps:g} MB/s a connection")
    print(f"{'tree':9} {'commit':8} {'merge s':>8} {'MB/s':>7} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['merge_s']:8.1f} "
              f"{args.parts * part_mb / r['merge_s']:7.1f} {r['driver_peak_rss_mb']:12.1f}")
    result = {"parts": args.parts, "part_rows": args.part_rows, "dim": DIM,
              "part_mb": round(part_mb, 1), "latency_ms": args.latency_ms,
              "stream_mbps": args.stream_mbps, "cpus": 2, "rows": rows,
              "load_avg_start": load, "load_avg_end": os.getloadavg()}
    if args.baseline_src:
        result["speedup"] = round(rows[0]["merge_s"] / rows[-1]["merge_s"], 2)
        print("speedup:", result["speedup"])
    save(args.out, result)


if __name__ == "__main__":
    main()
