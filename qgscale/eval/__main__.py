"""``python -m qgscale.eval --config X [key.path=value ...]``: the evaluation job.

Made for ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m qgscale.eval
--config configs/X.yaml``: inside a job it joins the job's cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qgscale import config as config_mod
from qgscale import storage
from qgscale.errors import report


def bm25_run_key(cfg: Any, queries: str, corpus: str) -> str:
    """The key of a BM25 baseline run: the queries' and the corpus's files (a corpus
    re-prepared at the same path is searched again), the tokenizer and the settings."""
    from qgscale.retrieval.bm25 import TOKENIZER

    return storage.config_hash({"queries": storage.fingerprint(queries), "corpus": corpus,
                                "corpus_files": storage.fingerprint(corpus),
                                "tokenizer": TOKENIZER, "bm25": [cfg.bm25.k1, cfg.bm25.b],
                                "eval": [cfg.eval.top_k, cfg.eval.pairs]})


def baseline_beside(cfg: Any, result: dict, data_uri: str, split: str, out_uri: str) -> None:
    """The BM25 baseline of ``split`` over the evaluated index's corpus (``bm25-eval``'s run
    written under ``out_uri/bm25/run/<split>``, resumable), its reports in
    ``out_uri/bm25/<split>/`` and ``out_uri/<split>.md``: BM25 and the student side by side."""
    from qgscale.eval.evaluate import (
        _queries_uri,
        chart_metric,
        comparison_table,
        evaluate_baseline,
    )
    from qgscale.retrieval.sharded import run_bm25_eval

    corpus = result["sources"]["corpus"]
    queries = _queries_uri(data_uri, split)
    run_dir = storage.join(out_uri, "bm25", "run", split)
    key = bm25_run_key(cfg, queries, corpus)
    if not storage.stage_done(run_dir, key):
        run_bm25_eval(cfg, queries, corpus, run_dir, key)
    base = evaluate_baseline(cfg, storage.join(run_dir, "run.parquet"), data_uri, split,
                             corpus, storage.join(out_uri, "bm25"))
    table = comparison_table({"bm25": base, "student": result},
                             chart_metric(result, cfg.eval.chart_metric))
    storage.write_bytes(storage.join(out_uri, f"{split}.md"), table.encode())
    print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qgscale.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--model", help="student to evaluate (default: eval.model, else the run's "
                    "distilled student, <run.root>/train/distill/model)")
    ap.add_argument("--index", help="FAISS index folder (default: eval.index, else the "
                    "pipeline's index of that student, "
                    "<run.root>/index/distill-<split or all>/faiss)")
    ap.add_argument("--out", help="report folder (default: eval.out, else "
                    "<run.root>/eval-job; the pipeline's eval stage keeps eval/)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable); bare KEY=VALUE arguments work too")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    args = ap.parse_args(argv)
    from qgscale import logs

    logs.console(args.verbose)
    try:
        flags = [f"eval.{k}={v}" for k, v in (("model", args.model), ("index", args.index),
                                              ("out", args.out)) if v]  # = --set eval.KEY
        cfg = config_mod.load(args.config, args.set + args.overrides + flags)
        from qgscale.eval.evaluate import check_inputs, run_eval
        from qgscale.layout import Layout

        lay, ec = Layout(cfg), cfg.eval
        out = ec.out or lay.uri("eval-job")
        logs.to_run_folder(out)  # the job's log under its reports (kept after the cluster)
        src = lay.students()  # eval.students_from: another run's students (zero-shot)
        jobs = [(split, ec.model or src.model("distill"), ec.index or src.faiss("distill", split))
                for split in ec.splits]
        data = lay.eval_data()
        for split, model, index in jobs:  # every input checked before Ray starts
            check_inputs(model, index, data, [split])
        for split, model, index in jobs:
            result = run_eval(cfg, model, index, data, out, [split])[split]
            if cfg.bm25.baseline:
                baseline_beside(cfg, result, data, split, out)
    except Exception as e:  # a user error: one line and exit 2; a bug: the traceback
        logs.failed(e)
        code = report(e)
        if code is None:
            raise
        return code
    finally:
        logs.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
