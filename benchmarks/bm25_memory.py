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

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save, trees  # noqa: E402


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


def main() -> None:
    ap = parser(__doc__, "bm25_memory.json")
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--queries", type=int, nargs="+", default=[4_000, 40_000])
    args = parse(ap, child)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-bm25-mem-") as tmp:
        for nq in args.queries:
            data = Path(tmp) / "data" / f"q{nq}"
            write_data(data, args.passages, nq)
            for name, src in trees(args.baseline_src):
                out = Path(tmp) / f"{name}-q{nq}"
                for phase in ("bm25-eval", "baseline-eval"):
                    r = measure(src, phase, data, out, __file__)
                    rows.append({"tree": name, "commit": commit(src), "queries": nq,
                                 "phase": phase, **r})
                    print(rows[-1], flush=True)
    print(f"\n{'tree':9} {'commit':8} {'queries':>8} {'phase':14} {'wall s':>7} "
          f"{'driver MB':>10} {'actor MB':>9}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['queries']:8d} {r['phase']:14} "
              f"{r['wall_s']:7.1f} {r['driver_peak_rss_mb']:10.1f} {r['actor_peak_rss_mb']:9.1f}")
    save(args.out, {"passages": args.passages, "top_k": 100, "cpus": 2, "rows": rows,
                    "load_avg_start": load, "load_avg_end": os.getloadavg()})


if __name__ == "__main__":
    main()
