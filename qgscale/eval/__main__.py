"""``python -m qgscale.eval --config X [key.path=value ...]``: the evaluation job.

Made for ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m qgscale.eval
--config configs/X.yaml``: inside a job it joins the job's cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import sys

from qgscale import config as config_mod
from qgscale.errors import report


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
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.set + args.overrides)
        from qgscale.eval.evaluate import check_inputs, run_eval
        from qgscale.layout import Layout

        lay, ec = Layout(cfg), cfg.eval
        jobs = [(split, args.model or ec.model or lay.model("distill"),
                 args.index or ec.index or lay.faiss("distill", split)) for split in ec.splits]
        data = ec.data or lay.data_root
        for split, model, index in jobs:  # every input checked before Ray starts
            check_inputs(model, index, data, [split])
        for split, model, index in jobs:
            run_eval(cfg, model, index, data, args.out or ec.out or lay.uri("eval-job"),
                     [split])
    except Exception as e:  # a user error: one line and exit 2; a bug: the traceback
        code = report(e)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
