"""``python -m qgscale.eval --config X [key.path=value ...]``: the evaluation job.

Made for ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m qgscale.eval
--config configs/X.yaml``: inside a job it joins the job's cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import sys

from qgscale import config as config_mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qgscale.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config file")
    ap.add_argument("--model", help="student to evaluate (default: eval.model, else the run's "
                    "distilled student, <run.root>/train/distill/model)")
    ap.add_argument("--index", help="FAISS index folder (default: eval.index, else the "
                    "pipeline's index of that student, <run.root>/index/distill-<split>/faiss)")
    ap.add_argument("--out", help="report folder (default: eval.out, else "
                    "<run.root>/eval/distill)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable); bare KEY=VALUE arguments work too")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.set + args.overrides)
    except (config_mod.ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from qgscale.eval.evaluate import run_eval
    from qgscale.layout import Layout

    lay, ec = Layout(cfg), cfg.eval
    try:
        for split in ec.splits:
            run_eval(cfg, args.model or ec.model or lay.model("distill"),
                     args.index or ec.index or lay.faiss("distill", split),
                     ec.data or lay.data_root, args.out or ec.out or lay.eval_dir("distill"),
                     [split])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
