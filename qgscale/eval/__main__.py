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
    ap.add_argument("--model", help="student to evaluate (default: eval.model or the distilled)")
    ap.add_argument("--index", help="FAISS index folder (default: eval.index or index/de1/faiss)")
    ap.add_argument("--out", help="report folder (default: eval.out or <run.root>/eval)")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable); bare KEY=VALUE arguments work too")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.set + args.overrides)
        from qgscale.eval.evaluate import run_eval

        run_eval(cfg, model_uri=args.model, index_uri=args.index, out_uri=args.out)
    except Exception as e:  # a user error: one line and exit 2; a bug: the traceback
        code = report(e)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
