"""Size the demo's student by quality per minute: MRR@10 (X -> en, XQuAD test articles) of the
untrained starting checkpoint and of the warm-up student for a few settings (layers kept of
the shipped 6-layer MiniLM, warm-up steps, learning rate, batch), with the warm-up's wall time.

Each setting runs the pipeline's own ``prepare`` and ``warmup`` stages under its own run root
(``<root>/<name>``) and is evaluated with the quality benchmark's ``evaluate`` (encode + index
the test corpus, then the eval stage's metrics). Settings are ``NAME:KEY=VALUE,KEY=VALUE``
overrides of the config (``--setting``), e.g. ``L6-s40:layers=6,warmup.max_steps=40``
(``layers`` sets ``encoder.model.overrides.num_hidden_layers``; ``warmup.max_steps=0``
evaluates the starting checkpoint only).

    python benchmarks/demo_size.py [--config configs/demo.yaml] --setting ... [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import evaluate, macro_mrr10  # noqa: E402

from qgscale import config as config_mod  # noqa: E402
from qgscale import pipeline, storage  # noqa: E402
from qgscale.layout import Layout  # noqa: E402

DEFAULT_SETTINGS = ["L3-s40:layers=3,warmup.max_steps=40"]


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME:K=V,K=V`` -> (name, config overrides)."""
    name, _, rest = text.partition(":")
    overrides = []
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k == "layers":
            k = "encoder.model.overrides.num_hidden_layers"
        overrides.append(f"{k}={v}")
    return name, overrides


def measure(base: str, root: str, name: str, overrides: list[str]) -> dict:
    """Prepare + warm-up (none with ``warmup.max_steps=0``) of one setting, then its init and
    warm-up students' MRR@10 on the test articles."""
    cfg = config_mod.load(base, [*overrides, f"run.root={root}/{name}"])
    lay = Layout(cfg)
    pipeline.run(cfg, only="prepare")
    out: dict = {"overrides": overrides}
    steps = cfg.warmup.max_steps
    if steps == 0:  # the starting checkpoint alone
        from qgscale.models.encoder import DualEncoder

        init = lay.model("init")
        if not storage.exists(storage.join(init, "dual_encoder.json")):
            DualEncoder.build(cfg.encoder, max_query_len=cfg.warmup.max_query_len,
                              max_passage_len=cfg.warmup.max_passage_len).save_pretrained(init)
    else:
        t0 = time.time()
        pipeline.run(cfg, only="warmup")
        record = pipeline.read_record(lay, "warmup") or {}
        out["warmup_s"] = round(record.get("wall_s") or time.time() - t0, 1)
        out["warmup_mrr10"] = macro_mrr10(evaluate(cfg, lay.model("warmup"), f"size-{name}",
                                                   lay.uri("size", "warmup")))
    out["init_mrr10"] = macro_mrr10(evaluate(cfg, lay.model("init"), f"size-{name}-init",
                                             lay.uri("size", "init")))
    if "warmup_mrr10" in out:
        out["warmup_gain_per_min"] = round(
            (out["warmup_mrr10"] - out["init_mrr10"]) / (out["warmup_s"] / 60), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--root", default="runs/demo-size")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME:K=V,...")
    ap.add_argument("--out", default="bench-out/demo_size.json")
    args = ap.parse_args()
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.exists() else {"config": args.config}
    report.setdefault("settings", {})
    for text in args.setting or DEFAULT_SETTINGS:
        name, overrides = parse_setting(text)
        load0 = os.getloadavg()
        report["settings"][name] = r = measure(args.config, args.root, name, overrides)
        r["load_average"] = {"start": [round(x, 2) for x in load0],
                             "end": [round(x, 2) for x in os.getloadavg()]}
        print(name, json.dumps(r), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))  # after each setting: partial results
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
