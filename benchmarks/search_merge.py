"""The merge of a sharded search's results in the caller (``ShardedSearcher._merge``: mine's
driver, the eval task): one block of queries' top-``k`` from every index shard's actor,
before and after the pids are carried along with the heap instead of a dict of every
shard's results.

    python benchmarks/search_merge.py --out benchmarks/results/search_merge.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Per source tree, a child process on a local Ray of 2 CPUs has ``--shards`` Ray tasks each
return one shard's result for a block of ``--block`` queries x ``--k`` (random scores,
disjoint random ids, pids ``"doc-<id>"``, as a search actor returns them: float32, int64 and
an object array), then merges them with ``ShardedSearcher._merge`` (the results sit in
Ray's object store until fetched) and checks the merged top-``k`` against the exact one.
Its peak RSS (the merge's memory, from outside: ``before_after.measure``) and the merge's
wall time. Prints a table; writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import commit, measure, parse, parser, save, trees  # noqa: E402


def shard_result(j: int, shards: int, n: int, k: int):
    """Shard ``j``'s top-``k`` for ``n`` queries: ids ``j, j + shards, ...`` (disjoint), a
    score a function of (query, id), sorted best first."""
    rng = np.random.default_rng(j)
    ids = (rng.integers(0, 50_000_000, size=(n, k)) * shards + j).astype(np.int64)
    dist = np.sort(score(np.arange(n)[:, None], ids), axis=1)[:, ::-1].astype(np.float32)
    ids = np.take_along_axis(ids, np.argsort(-score(np.arange(n)[:, None], ids), axis=1,
                                             kind="stable"), 1)
    pids = np.vectorize(lambda i: f"doc-{i}", otypes=[object])(ids)
    return dist, ids, pids


def score(q: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ((q * 2654435761 + ids * 40503) % 1_000_003).astype(np.float32)


def child(phase: str, data: str, out: str) -> None:
    """Merge the shards' results of one block; prints the time."""
    import ray

    from qgscale.index.search import ShardedSearcher

    shards, n, k = (int(x) for x in phase.split("x"))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = ray.remote(shard_result)
    futures = [task.remote(j, shards, n, k) for j in range(shards)]
    ray.wait(futures, num_returns=len(futures), fetch_local=False)  # all in the object store
    searcher = object.__new__(ShardedSearcher)
    searcher.metric = "ip"
    t0 = time.time()
    pids, scores = searcher._merge(n, k, futures)
    wall = round(time.time() - t0, 2)
    best = np.sort(np.concatenate([ray.get(f)[0][:4] for f in futures], axis=1), axis=1)
    assert np.array_equal(scores[:4], best[:, ::-1][:, :k]), "not the top k"
    for q in range(4):  # each pid's own score is the one returned beside it
        got = np.array([int(p.split("-")[1]) for p in pids[q]])
        assert np.array_equal(score(np.full(k, q), got), scores[q]), "a pid is not its score's"
    print(json.dumps({"merge_s": wall, "entries": shards * n * k}), flush=True)
    if started:
        ray.shutdown()


def main() -> None:
    ap = parser(__doc__, "search_merge.json")
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--k", type=int, default=200)
    args = parse(ap, child)
    phase = f"{args.shards}x{args.block}x{args.k}"
    rows, load = [], os.getloadavg()
    for name, src in trees(args.baseline_src):
        r = measure(src, phase, Path("."), Path("."), __file__)
        rows.append({"tree": name, "commit": commit(src), **r})
        print(rows[-1], flush=True)
    print(f"\n{args.shards} shards x {args.block} queries x top {args.k}")
    print(f"{'tree':9} {'commit':8} {'merge s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['merge_s']:8.2f} "
              f"{r['driver_peak_rss_mb']:12.1f}")
    result = {"shards": args.shards, "block": args.block, "k": args.k, "cpus": 2,
              "rows": rows, "load_avg_start": load, "load_avg_end": os.getloadavg()}
    if args.baseline_src:
        result["rss_ratio"] = round(rows[-1]["driver_peak_rss_mb"]
                                    / rows[0]["driver_peak_rss_mb"], 2)
        print("peak RSS after / before:", result["rss_ratio"])
    save(args.out, result)


if __name__ == "__main__":
    main()
