"""The corpus semi-join and the scoring join as the needed passages grow, measured per shard.

    python benchmarks/corpus_join.py --out benchmarks/results/corpus_join.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Every stage that needs passage text scans the corpus shard by shard for the pids it needs
(``qgscale.data.corpus.scan``), and the teacher's scoring join does it on Ray actors for
every candidate pair (``qgscale.teacher.scoring.join_pairs``). What one shard costs there
must not grow with what is needed: at 1B passages there are 10k shards or more.

Data (synthetic, written once): a corpus of ``--shards`` x ``--shard-rows`` passages of 12
words (``benchmarks/scale.py``'s word frequencies); for each ``--queries`` size, that many
queries with 30 candidate pids each, drawn uniformly from the corpus (so the needed pids
grow with the queries, as in training). Per (source tree, size), two child processes:
``scan`` (``list(scan(corpus, needed pids))`` in the child: wall time per shard) and
``join`` (``join_pairs`` on a local Ray of 2 CPUs with 2 actors: the stage's wall time;
every pair joined). A sampler thread here reads every 0.1 s the resident memory (RSS,
psutil) of the child and of its largest ``ray::`` worker. ``--baseline-src`` runs the same
children with another tree first on ``PYTHONPATH`` (its commit recorded): before/after in
one run. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bm25_memory import REPO, commit, measure  # noqa: E402

K = 30  # candidates per query


def write_corpus(root: Path, shards: int, shard_rows: int, seed: int = 0) -> None:
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import CORPUS

    words, probs = word_list()
    rng = np.random.default_rng(seed)
    n = shards * shard_rows
    ids = rng.choice(len(words), (n, 12), p=probs)
    storage.ShardWriter(str(root / "corpus")).write_rows(
        ({"pid": f"en:{i}", "lang": "en", "title": f"t{i}", "text": " ".join(words[ids[i]])}
         for i in range(n)), shard_rows, CORPUS)


def write_pairs(root: Path, n_passages: int, n_queries: int, seed: int = 1) -> None:
    import pyarrow as pa

    from qgscale import storage
    from qgscale.data.schema import CANDIDATES, QUERIES

    rng = np.random.default_rng(seed)
    pids = [[f"en:{p}" for p in rng.choice(n_passages, K, replace=False)]
            for _ in range(n_queries)]
    qids = [f"q{j}" for j in range(n_queries)]
    storage.write_parquet(str(root / "queries" / "part-00000.parquet"), pa.table(
        {"qid": qids, "lang": ["de"] * n_queries, "text": [f"query {j}" for j in qids]},
        schema=QUERIES))
    storage.write_parquet(str(root / "candidates" / "part-00000.parquet"), pa.table(
        {"qid": qids, "pids": pids, "scores": pa.nulls(n_queries,
                                                       CANDIDATES.field("scores").type)},
        schema=CANDIDATES))


def child(phase: str, data: str, out: str) -> None:
    """One phase in this process (``--child``): prints its wall time as JSON."""
    import pyarrow.compute as pc

    from qgscale import storage
    from qgscale.data.corpus import corpus_shards, scan

    corpus = str(Path(data).parent / "corpus")
    if phase == "scan":
        needed = pc.unique(pc.list_flatten(storage.read_parquet(
            f"{data}/candidates", ["pids"]).column("pids")))
        t0 = time.time()
        rows = sum(t.num_rows for t in scan(corpus, needed, ("pid", "title", "text")))
        extra = {"needed_pids": len(needed), "rows": rows}
    else:
        from qgscale.config import ScoreConfig
        from qgscale.runtime import connect
        from qgscale.teacher.scoring import join_pairs

        connect(type("R", (), {"num_cpus": 2})())
        t0 = time.time()
        m = join_pairs(f"{data}/candidates", f"{data}/queries", corpus, f"{out}/pairs",
                       "bench", ScoreConfig(num_actors=2))
        extra = {"rows": m["rows"]}
    wall = time.time() - t0
    print(json.dumps({"wall_s": round(wall, 2), "per_shard_s": round(
        wall / len(corpus_shards(corpus)), 3), **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--queries", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "corpus_join.json"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    trees = ([("baseline", args.baseline_src.resolve())] if args.baseline_src else []) + \
        [("this", REPO)]
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-corpus-join-") as tmp:
        write_corpus(Path(tmp), args.shards, args.shard_rows)
        for nq in args.queries:
            data = Path(tmp) / f"q{nq}"
            write_pairs(data, args.shards * args.shard_rows, nq)
            for name, src in trees:
                for phase in ("scan", "join"):
                    r = measure(src, phase, data, Path(tmp) / f"{name}-{phase}-q{nq}",
                                script=__file__)
                    rows.append({"tree": name, "commit": commit(src), "queries": nq,
                                 "pairs": nq * K, "phase": phase, **r})
                    print(rows[-1], flush=True)
    print(f"\n{'tree':9} {'commit':8} {'pairs':>9} {'phase':5} {'wall s':>7} {'s/shard':>8} "
          f"{'driver MB':>10} {'actor MB':>9}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['pairs']:9d} {r['phase']:5} {r['wall_s']:7.1f} "
              f"{r['per_shard_s']:8.3f} {r['driver_peak_rss_mb']:10.1f} "
              f"{r['actor_peak_rss_mb']:9.1f}")
    result = {"passages": args.shards * args.shard_rows, "shards": args.shards,
              "candidates_per_query": K, "cpus": 2, "rows": rows, "load_avg_start": load,
              "load_avg_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
