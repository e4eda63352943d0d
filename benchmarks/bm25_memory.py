"""BM25 baseline memory as the number of queries grows, measured from outside.

    python benchmarks/bm25_memory.py --out benchmarks/results/bm25_memory.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): a corpus of ``--passages`` passages of 100 words drawn from
the word frequencies of the bundled XQuAD English paragraphs (as ``benchmarks/scale.py``),
in 2 parquet shards; for each size of ``--queries``, that many queries, each an 8-word span
of a random passage (its positive, rel 1 in the qrels). Only the queries grow.

Per (source tree, size), two child processes run what the pipeline runs, on a local Ray of
2 CPUs: ``bm25-eval`` (``qgscale.retrieval.sharded.run_bm25_eval``: statistics and search
as shard jobs on Ray actors, top 100 folded on the driver, ``run.parquet`` written) and the
baseline's eval (``qgscale.eval.evaluate.evaluate_baseline``: the run read and scored). A
sampler thread here reads every 0.1 s the resident memory (RSS, psutil) of the child
(``driver_peak_rss_mb``) and of its Ray worker processes (``actor_peak_rss_mb``: the largest
``ray::`` process). ``--baseline-src`` runs the same children with another source tree first
on ``PYTHONPATH`` (the commit is recorded), giving before/after in one run. Prints a table;
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def write_data(root: Path, n_passages: int, n_queries: int, seed: int = 0) -> None:
    """``root/corpus`` (2 shards) and ``root/test/{queries,qrels}``; the corpus is shared
    by every size (written once, under ``root/../corpus``)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import CORPUS, QRELS, QUERIES

    words, probs = word_list()
    corpus = root.parent / "corpus"
    rng = np.random.default_rng(seed)
    texts = [" ".join(words[rng.choice(len(words), 100, p=probs)]) for _ in range(n_passages)]
    if not corpus.exists():
        storage.ShardWriter(str(corpus)).write_rows(
            ({"pid": f"en:{i}", "lang": "en", "title": f"t{i}", "text": t}
             for i, t in enumerate(texts)), (n_passages + 1) // 2, CORPUS)
    pos = rng.integers(n_passages, size=n_queries)
    starts = rng.integers(0, 92, size=n_queries)
    queries = [{"qid": f"q{j}", "lang": "en",
                "text": " ".join(texts[p].split()[s:s + 8])}
               for j, (p, s) in enumerate(zip(pos, starts, strict=True))]
    storage.ShardWriter(str(root / "test" / "queries")).write_rows(queries, 100_000, QUERIES)
    storage.ShardWriter(str(root / "test" / "qrels")).write_rows(
        ({"qid": f"q{j}", "pid": f"en:{p}", "rel": 1} for j, p in enumerate(pos)), 100_000,
        QRELS)


def child(phase: str, data: str, out: str) -> None:
    """One phase in this process (``--child``): prints its wall time as JSON."""
    import qgscale
    from qgscale import config, storage
    from qgscale.runtime import connect

    cfg = config.load(Path(qgscale.__file__).parents[1] / "configs" / "demo.yaml",
                      [f"run.root={out}/run", "eval.top_k=100", "bm25.num_actors=2",
                       "ray.num_cpus=2", "eval.answer_recall=false"])
    t0 = time.time()
    corpus = str(Path(data).parent / "corpus")
    if phase == "bm25-eval":
        from qgscale.retrieval.sharded import run_bm25_eval

        connect(cfg.ray)
        m = run_bm25_eval(cfg, f"{data}/test/queries", corpus, f"{out}/bm25-eval", "bench")
        extra = {"rows": m["rows"]}
    else:
        from qgscale.eval.evaluate import evaluate_baseline

        r = evaluate_baseline(cfg, storage.join(f"{out}/bm25-eval", "run.parquet"), data,
                              "test", corpus, f"{out}/reports")
        extra = {"mrr10": r["query_langs"]["en"]["mrr@10"]}
    print(json.dumps({"wall_s": round(time.time() - t0, 2), **extra}), flush=True)


def measure(src: Path, phase: str, data: Path, out: Path, script: str = __file__
            ) -> dict[str, Any]:
    """Run ``script --child phase data out`` with ``src`` first on PYTHONPATH, sampling its
    RSS and its largest Ray worker's."""
    import psutil

    env = dict(os.environ, PYTHONPATH=f"{src}:{REPO}", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, script, "--child", phase, str(data), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=src)
    peak = {"driver": 0, "actor": 0}
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak["driver"] = max(peak["driver"], p.memory_info().rss)
                for c in p.children(recursive=True):
                    try:
                        if c.cmdline()[:1] and c.cmdline()[0].startswith("ray::"):
                            peak["actor"] = max(peak["actor"], c.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{phase} with {src} failed (exit {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {**res, "driver_peak_rss_mb": round(peak["driver"] / MB, 1),
            "actor_peak_rss_mb": round(peak["actor"] / MB, 1)}


def commit(src: Path) -> str:
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--queries", type=int, nargs="+", default=[4_000, 40_000])
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bm25_memory.json"))
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    trees = ([("baseline", args.baseline_src.resolve())] if args.baseline_src else []) + \
        [("this", REPO)]
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-bm25-mem-") as tmp:
        for nq in args.queries:
            data = Path(tmp) / "data" / f"q{nq}"
            write_data(data, args.passages, nq)
            for name, src in trees:
                out = Path(tmp) / f"{name}-q{nq}"
                for phase in ("bm25-eval", "baseline-eval"):
                    r = measure(src, phase, data, out)
                    rows.append({"tree": name, "commit": commit(src), "queries": nq,
                                 "phase": phase, **r})
                    print(rows[-1], flush=True)
    print(f"\n{'tree':9} {'commit':8} {'queries':>8} {'phase':14} {'wall s':>7} "
          f"{'driver MB':>10} {'actor MB':>9}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['queries']:8d} {r['phase']:14} "
              f"{r['wall_s']:7.1f} {r['driver_peak_rss_mb']:10.1f} {r['actor_peak_rss_mb']:9.1f}")
    result = {"passages": args.passages, "top_k": 100, "cpus": 2, "rows": rows,
              "load_avg_start": load,
              "load_avg_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
