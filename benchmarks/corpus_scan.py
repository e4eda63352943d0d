"""A driver's corpus lookup (``qgscale.data.corpus.scan``: the passages of a stage's training
rows, eval blocks, generation), before and after each shard is read and filtered by a Ray task
instead of one shard after another in the driver.

    python benchmarks/corpus_scan.py --out benchmarks/results/corpus_scan.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): ``--shards`` x ``--shard-rows`` passages of 12 words
(``scale.word_list``) on the local disk and, through ``qgscale.storage``, in a bucket of a
moto S3 server over HTTP on 127.0.0.1 (started here); ``--needed`` pids drawn at random, so
nearly every shard has some (as the positives and negatives of 15k training queries in a
corpus of 180 shards). Stores: ``local``; ``s3`` (moto, straight); ``s3-latency``: moto
behind a proxy here that holds every request ``--latency-ms`` before passing it on (S3's
first-byte latency; the bandwidth and CPU of this machine are unchanged).

Per (source tree, store), a child process on its own local Ray of 2 CPUs calls
``read_passages(corpus, needed)`` twice (``first_s`` includes starting Ray's task workers,
``second_s`` reuses them) and checks it got every pid, then ``sample_pids(corpus, --sample,
0)`` (``sample_s``, and the driver's CPU seconds in it: random negatives' sample, 100k of 18M
passages at scale; before, every shard's pid column went to the
driver, after only the pids below a threshold set from the corpus manifest's row count);
the driver's peak RSS and CPU seconds come from outside (``before_after.measure``). Prints a
table; writes JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import commit, measure, parse, parser, save, trees  # noqa: E402

STORES = ("local", "s3", "s3-latency")


def write_data(root: Path, n_shards: int, shard_rows: int, n_needed: int, s3: str) -> None:
    """The corpus under ``root/corpus`` and ``s3/corpus``; ``root/needed.json``."""
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import CORPUS

    words, probs = word_list()
    rng = np.random.default_rng(0)
    n = n_shards * shard_rows
    for name in (str(root / "corpus"), f"{s3}/corpus"):
        writer = storage.ShardWriter(name)
        for s in range(n_shards):
            idx = rng.choice(len(words), (shard_rows, 12), p=probs)
            writer.write(storage.shard_name(s), __import__("pyarrow").table({
                "pid": [f"en:{s * shard_rows + i}" for i in range(shard_rows)],
                "lang": ["en"] * shard_rows, "title": [""] * shard_rows,
                "text": [" ".join(words[r]) for r in idx]}, schema=CORPUS))
        writer.finalize()  # its manifest, as `qgscale data prepare` writes (row counts)
    needed = sorted(f"en:{i}" for i in rng.choice(n, n_needed, replace=False))
    (root / "needed.json").write_text(json.dumps(needed))


def child(phase: str, data: str, out: str) -> None:
    """``read_passages`` twice on the ``phase`` store (local, s3), then ``sample_pids``:
    prints the times."""
    from qgscale.data.corpus import read_passages, sample_pids
    from qgscale.runtime import connect

    connect(type("R", (), {"num_cpus": 2})())
    needed = set(json.loads(Path(data, "needed.json").read_text()))
    if phase == "s3-latency":
        os.environ["AWS_ENDPOINT_URL"] = os.environ["BENCH_SLOW_ENDPOINT"]
    corpus = f"{data}/corpus" if phase == "local" else f"{os.environ['BENCH_S3']}/corpus"
    times = []
    for _ in range(2):
        t0 = time.time()
        got = read_passages(corpus, needed)
        times.append(round(time.time() - t0, 2))
        assert set(got) == needed, "not every needed pid was found"
    k = int(os.environ["BENCH_SAMPLE"])
    t0, cpu0 = time.time(), time.process_time()
    sample = sample_pids(corpus, k, 0)
    sample_s = round(time.time() - t0, 2)
    sample_cpu = round(time.process_time() - cpu0, 2)  # this process's (the driver's)
    assert len(set(sample)) == k, "the sample is not k distinct pids"
    print(json.dumps({"wall_s": sum(times), "first_s": times[0], "second_s": times[1],
                      "sample_s": sample_s, "sample_driver_cpu_s": sample_cpu}), flush=True)


def s3_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server on 127.0.0.1 and a bucket on it; sets the AWS variables here (the
    children inherit them)."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    bucket = f"qgs-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return proc, f"s3://{bucket}"


def latency_proxy(target: str, latency_s: float, bandwidth: float = 0.0) -> str:
    """A TCP proxy on 127.0.0.1 (a daemon thread) that passes each chunk a client sends to
    ``target`` (``http://host:port``) ``latency_s`` late, and the replies at once, or paced
    to ``bandwidth`` bytes/s per connection when given (one S3 GET stream's rate); its URL."""
    import asyncio
    import threading

    host, port = target.rsplit("/", 1)[1].split(":")
    ready: list[int] = []

    async def pipe(reader, writer, delay: float, rate: float = 0.0) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                if rate:
                    await asyncio.sleep(len(data) / rate)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(c_reader, c_writer) -> None:
        s_reader, s_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(c_reader, s_writer, latency_s),
                             pipe(s_reader, c_writer, 0, bandwidth))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    while not ready:
        time.sleep(0.05)
    return f"http://127.0.0.1:{ready[0]}"


def main() -> None:
    ap = parser(__doc__, "corpus_scan.json")
    ap.add_argument("--shards", type=int, default=180)
    ap.add_argument("--shard-rows", type=int, default=5_000)
    ap.add_argument("--needed", type=int, default=20_000)
    ap.add_argument("--latency-ms", type=float, default=25.0)
    ap.add_argument("--sample", type=int, default=5_000,
                    help="sample_pids' k (5,000 of 900k: the share of the random negatives' "
                         "100k at 18M passages)")
    args = parse(ap, child)
    os.environ["BENCH_SAMPLE"] = str(args.sample)
    proc, bucket = s3_server()
    os.environ["BENCH_S3"] = bucket
    os.environ["BENCH_SLOW_ENDPOINT"] = latency_proxy(os.environ["AWS_ENDPOINT_URL"],
                                                      args.latency_ms / 1000)
    rows, load = [], os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="qgs-scan-") as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            write_data(data, args.shards, args.shard_rows, args.needed, bucket)
            for store in STORES:
                for name, src in trees(args.baseline_src):
                    r = measure(src, store, data, Path(tmp) / f"{name}-{store}", __file__)
                    rows.append({"tree": name, "commit": commit(src), "store": store, **r})
                    print(rows[-1], flush=True)
    finally:
        proc.terminate()
    print(f"\n{'tree':9} {'commit':8} {'store':10} {'first s':>8} {'second s':>9} "
          f"{'sample s':>9} {'its CPU s':>9} {'driver CPU s':>13} {'driver RSS MB':>14}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['store']:10} {r['first_s']:8.1f} "
              f"{r['second_s']:9.1f} {r.get('sample_s', float('nan')):9.2f} "
              f"{r.get('sample_driver_cpu_s', float('nan')):9.2f} "
              f"{r['driver_cpu_s']:13.1f} {r['driver_peak_rss_mb']:14.1f}")
    result = {"shards": args.shards, "shard_rows": args.shard_rows, "needed": args.needed,
              "sample": args.sample,
              "latency_ms": args.latency_ms, "cpus": 2, "rows": rows, "load_avg_start": load,
              "load_avg_end": os.getloadavg()}
    if args.baseline_src:
        result["speedup_second"] = {
            store: round(b["second_s"] / t["second_s"], 2)
            for store in STORES
            for b, t in [[r for r in rows if r["store"] == store]]}
        print("speedup (second call):", result["speedup_second"])
        result["speedup_sample"] = {
            store: round(b["sample_s"] / t["sample_s"], 2)
            for store in STORES
            for b, t in [[r for r in rows if r["store"] == store]]}
        print("speedup (sample_pids):", result["speedup_sample"])
    save(args.out, result)


if __name__ == "__main__":
    main()
