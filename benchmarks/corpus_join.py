"""The corpus semi-join and the scoring join as the needed passages grow, measured per shard.

    python benchmarks/corpus_join.py --out benchmarks/results/corpus_join.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way
        [--phases stage ray]   # the actors' join beside the Ray Data join

Every stage that needs passage text scans the corpus shard by shard for the pids it needs
(``qgscale.data.corpus.scan``), and the teacher's scoring join does it on Ray actors for
every candidate pair (``qgscale.teacher.scoring.join_pairs``). What one shard costs there
must not grow with what is needed: at 1B passages there are 10k shards or more.

Data (synthetic, written once): a corpus of ``--shards`` x ``--shard-rows`` passages of 12
words (``benchmarks/scale.py``'s word frequencies); for each ``--queries`` size, that many
queries with 30 candidate pids each, in files of 5,000 lists. Per (source tree, size), a
child process per phase (``--phases``):

- ``scan``: ``list(scan(corpus, needed pids))``: wall time per shard;
- ``join``: one ``PairJob`` (built as the tree's ``join_pairs`` builds it) run on every
  shard in the child (a local Ray of 1 CPU holds its inputs): setup (reading and checking
  the candidates, what the driver puts, the actor's setup) and wall per shard;
- ``stage``: ``join_pairs`` itself on a local Ray of 2 CPUs and 2 actors: wall and memory;
- ``ray``: ``join_pairs`` on the Ray Data path (``ray_from=0``, 8 hash partitions), the same
  pairs on the same local Ray: the join that no process holds the pairs of.

For ``scan`` and ``join`` the candidates are drawn from a notional corpus ``--notional``
times larger (the shards here are its first ones), so a shard matches what a shard of a
large corpus matches while the needed set grows; ``stage`` and ``ray`` draw them from the
corpus here (they check that every candidate is in the corpus). A sampler thread here reads
every 0.1 s the resident memory (RSS, psutil) of the child and of its largest ``ray::``
worker, and every 0.5 s their USS (RSS less the pages shared with other processes, e.g. the
object store's).
``--baseline-src`` runs the same children with another tree first on ``PYTHONPATH`` (its
commit recorded): before/after in one run. Prints a table; writes JSON.
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

K = 30  # candidates per query
LISTS_PER_FILE = 5000  # candidate lists per file (mine.shard_rows' default)


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
    """``root/queries`` and ``root/candidates``, one folder per pid range: ``notional``
    (drawn from ``n_passages``, most of them beyond the corpus) and ``in_corpus``."""
    import pyarrow as pa

    from qgscale import storage
    from qgscale.data.schema import CANDIDATES, QUERIES

    rng = np.random.default_rng(seed)
    qids = [f"q{j}" for j in range(n_queries)]
    storage.write_parquet(str(root / "queries" / "part-00000.parquet"), pa.table(
        {"qid": qids, "lang": ["de"] * n_queries, "text": [f"query {j}" for j in qids]},
        schema=QUERIES))
    for name, n in (("notional", n_passages), ("in_corpus", None)):
        n = n or int(storage.read_json(str(root.parent / "corpus_size.json"))["passages"])
        pids = [[f"en:{p}" for p in rng.choice(n, K, replace=False)] for _ in qids]
        for i in range(0, n_queries, LISTS_PER_FILE):  # shards, as mine writes them
            m = min(LISTS_PER_FILE, n_queries - i)
            storage.write_parquet(str(root / "candidates" / name / f"part-{i:08d}.parquet"),
                                  pa.table({"qid": qids[i:i + m], "pids": pids[i:i + m],
                                            "scores": pa.nulls(m, CANDIDATES.field(
                                                "scores").type)}, schema=CANDIDATES))


def child(phase: str, data: str, out: str) -> None:
    """One phase in this process (``--child``): prints its wall time as JSON."""
    import pyarrow.compute as pc

    from qgscale import storage
    from qgscale.data.corpus import corpus_shards, scan
    from qgscale.runtime import connect

    corpus = str(Path(data).parent / "corpus")
    shards = corpus_shards(corpus)
    cands = f"{data}/candidates/" + ("in_corpus" if phase in ("stage", "ray") else "notional")
    extra = {}
    if phase == "scan":
        needed = pc.unique(pc.list_flatten(storage.read_parquet(cands, ["pids"])
                                           .column("pids")))
        t0 = time.time()
        rows = sum(t.num_rows for t in scan(corpus, needed, ("pid", "title", "text")))
        extra = {"needed_pids": len(needed), "rows": rows}
    elif phase == "join":
        import ray

        from qgscale.runtime import Shard
        from qgscale.teacher import scoring

        connect(type("R", (), {"num_cpus": 1})())
        t_setup = time.time()  # the driver's part and the actor's setup
        if hasattr(scoring, "pair_job"):
            job = scoring.pair_job(cands, f"{data}/queries")[0]
        else:  # trees before the KeyIndex: the pairs and queries put as they are
            pairs = scoring.candidate_pairs(cands)
            job = scoring.PairJob(ray.put(pairs.select(["qid", "pid"])),
                                  ray.put(scoring.query_table(f"{data}/queries")))
            del pairs
        st = job.setup("cpu", 1)
        t0 = time.time()
        outs = [job.run(st, Shard(f"part-{i:05d}", 1, u)) for i, u in enumerate(shards)]
        rows = sum((o[0] if isinstance(o, tuple) else o).num_rows for o in outs)
        extra = {"setup_s": round(t0 - t_setup, 2), "rows": rows}
    else:
        from qgscale.config import ScoreConfig
        from qgscale.teacher.scoring import join_pairs

        connect(type("R", (), {"num_cpus": 2})())
        t0 = time.time()
        kw = {"ray_from": 0, "num_partitions": 8} if phase == "ray" else {}
        m = join_pairs(cands, f"{data}/queries", corpus, f"{out}/pairs", "bench",
                       ScoreConfig(num_actors=2), **kw)
        extra = {"rows": m["rows"], "shards_written": len(m["shards"])}
    wall = time.time() - t0
    print(json.dumps({"wall_s": round(wall, 2), "per_shard_s": round(wall / len(shards), 3),
                      **extra}), flush=True)


def main() -> None:
    ap = parser(__doc__, "corpus_join.json")
    ap.add_argument("--shards", type=int, default=40)
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--queries", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument("--notional", type=int, default=25)
    ap.add_argument("--phases", nargs="+", default=["scan", "join", "stage"],
                    choices=["scan", "join", "stage", "ray"])
    args = parse(ap, child)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-corpus-join-") as tmp:
        n = args.shards * args.shard_rows
        write_corpus(Path(tmp), args.shards, args.shard_rows)
        (Path(tmp) / "corpus_size.json").write_text(json.dumps({"passages": n}))
        for nq in args.queries:
            data = Path(tmp) / f"q{nq}"
            write_pairs(data, n * args.notional, nq)
            for name, src in trees(args.baseline_src):
                for phase in args.phases:
                    if phase == "ray" and not (src / "qgscale/teacher/pairs_dataset.py").exists():
                        continue  # a tree before the Ray Data join
                    r = measure(src, phase, data, Path(tmp) / f"{name}-{phase}-q{nq}", __file__)
                    rows.append({"tree": name, "commit": commit(src), "queries": nq,
                                 "pairs": nq * K, "phase": phase, **r})
                    print(rows[-1], flush=True)
    print(f"\n{'tree':9} {'commit':8} {'pairs':>9} {'phase':5} {'wall s':>7} {'s/shard':>8} "
          f"{'driver MB':>10} {'actor MB':>9} {'driver USS':>10} {'actor USS':>9}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['pairs']:9d} {r['phase']:5} {r['wall_s']:7.1f} "
              f"{r['per_shard_s']:8.3f} {r['driver_peak_rss_mb']:10.1f} "
              f"{r['actor_peak_rss_mb']:9.1f} {r['driver_peak_uss_mb']:10.1f} "
              f"{r['actor_peak_uss_mb']:9.1f}")
    save(args.out, {"passages": n, "shards": args.shards, "notional_passages": n * args.notional,
                    "candidates_per_query": K, "cpus": 2, "rows": rows, "load_avg_start": load,
                    "load_avg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
