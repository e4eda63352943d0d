"""The bm25 stages' merge of the corpus shards' top-k lists, before and after it became a
tree of merge jobs on the actors (and an Arrow sort) instead of a Python fold on the driver.

    python benchmarks/bm25_merge.py --out benchmarks/results/bm25_merge.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): ``--passages`` passages of 60 words drawn from the word
frequencies of the bundled XQuAD English paragraphs (``scale.word_list``) in ``--shards``
parquet shards (many small shards: the number of lists to merge is shards x queries), and
``--queries`` queries, each an 8-word span of a random passage.

Per source tree, a child process runs stage ``bm25-eval`` (``run_bm25_eval``: statistics,
search, merge, ``run.parquet``, top 100) on its own local Ray of 2 CPUs with one bm25 actor
(the driver has the other CPU). The child times the stage and the end of its search shard
jobs (``run_shards`` wrapped in the stage's module: both trees call it), so
``after_search_s`` is the merge: the driver's fold before, the merge jobs and the driver's
fold of at most 16 outputs after. From outside (``before_after.measure``): the driver's CPU
seconds and peak RSS. Each tree runs ``--repeat`` times, the order alternating (the second
of two runs here tends to be slower); the medians are compared. Every run must write the
same run (its rows compared). Prints a table; writes JSON.
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


def write_data(root: Path, n_passages: int, n_shards: int, n_queries: int) -> None:
    """``root/corpus`` (``n_shards`` shards) and ``root/test/queries``."""
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import CORPUS, QUERIES

    words, probs = word_list()
    rng = np.random.default_rng(0)
    texts = [" ".join(words[rng.choice(len(words), 60, p=probs)]) for _ in range(n_passages)]
    storage.ShardWriter(str(root / "corpus")).write_rows(
        ({"pid": f"en:{i}", "lang": "en", "title": "", "text": t}
         for i, t in enumerate(texts)), -(-n_passages // n_shards), CORPUS)
    pos, starts = rng.integers(n_passages, size=n_queries), rng.integers(0, 52, n_queries)
    storage.ShardWriter(str(root / "test" / "queries")).write_rows(
        ({"qid": f"q{j}", "lang": "en", "text": " ".join(texts[p].split()[s:s + 8])}
         for j, (p, s) in enumerate(zip(pos, starts, strict=True))), 100_000, QUERIES)


def child(phase: str, data: str, out: str) -> None:
    """Stage bm25-eval in this process (``--child``): prints its times as JSON."""
    import qgscale
    from qgscale import config
    from qgscale.retrieval import sharded
    from qgscale.runtime import connect

    cfg = config.load(Path(qgscale.__file__).parents[1] / "configs" / "demo.yaml",
                      [f"run.root={out}/run", "eval.top_k=100", "bm25.num_actors=1",
                       "ray.num_cpus=2"])
    connect(cfg.ray)
    ends: dict[str, float] = {}
    run_shards = sharded.run_shards

    def timed(*args, **kw):
        result = run_shards(*args, **kw)
        ends[kw.get("desc", "")] = time.time()
        return result

    sharded.run_shards = timed
    t0 = time.time()
    m = sharded.run_bm25_eval(cfg, f"{data}/test/queries", f"{data}/corpus",
                              f"{out}/bm25-eval", "bench")
    t1 = time.time()
    print(json.dumps({"wall_s": round(t1 - t0, 2), "rows": m["rows"],
                      "search_s": round(ends["bm25 search"] - t0, 2),
                      "after_search_s": round(t1 - ends["bm25 search"], 2),
                      "merge_jobs": sorted(k for k in ends if "merge" in k)}), flush=True)


def main() -> None:
    ap = parser(__doc__, "bm25_merge.json")
    ap.add_argument("--passages", type=int, default=64_000)
    ap.add_argument("--shards", type=int, default=160)
    ap.add_argument("--queries", type=int, default=4_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each tree (median)")
    args = parse(ap, child)
    import pyarrow.parquet as pq

    rows, runs, load = [], [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-bm25-merge-") as tmp:
        data = Path(tmp) / "data"
        write_data(data, args.passages, args.shards, args.queries)
        for rep in range(args.repeat):
            for name, src in trees(args.baseline_src)[::-1 if rep % 2 else 1]:
                out = Path(tmp) / f"{name}-{rep}"
                r = measure(src, "bm25-eval", data, out, __file__)
                rows.append({"tree": name, "commit": commit(src), "run": rep, **r})
                runs.append(pq.read_table(out / "bm25-eval" / "run.parquet"))
                print(rows[-1], flush=True)
    same = all(t.equals(runs[0]) for t in runs)
    cols = ("wall_s", "search_s", "after_search_s", "driver_cpu_s", "driver_peak_rss_mb")
    print(f"\n{'tree':9} {'commit':8} {'run':>3} {'wall s':>7} {'search s':>9} "
          f"{'after search s':>15} {'driver CPU s':>13} {'driver RSS MB':>14}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['run']:3d} {r['wall_s']:7.1f} "
              f"{r['search_s']:9.1f} {r['after_search_s']:15.1f} {r['driver_cpu_s']:13.1f} "
              f"{r['driver_peak_rss_mb']:14.1f}")
    median = {name: {c: float(np.median([r[c] for r in rows if r["tree"] == name]))
                     for c in cols} for name, _ in trees(args.baseline_src)}
    result = {"passages": args.passages, "shards": args.shards, "queries": args.queries,
              "top_k": 100, "cpus": 2, "bm25_actors": 1, "repeat": args.repeat,
              "median": median, "rows": rows, "same_run": same,
              "load_avg_start": load, "load_avg_end": os.getloadavg()}
    if len(median) == 2:
        b, t = median["baseline"], median["this"]
        result["after_search_speedup"] = round(b["after_search_s"] / t["after_search_s"], 2)
        result["driver_cpu_ratio"] = round(b["driver_cpu_s"] / t["driver_cpu_s"], 2)
        print(f"medians: after the search {result['after_search_speedup']}x faster; driver "
              f"CPU {result['driver_cpu_ratio']}x less; wall {b['wall_s']:.1f} -> "
              f"{t['wall_s']:.1f} s; search {b['search_s']:.1f} -> {t['search_s']:.1f} s")
    save(args.out, result)
    if not same:
        sys.exit("the trees wrote different runs")


if __name__ == "__main__":
    main()
