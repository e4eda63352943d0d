"""The quality experiment: contrastive vs + KD vs + KD + alignment, from the same weights.

Trains on XQuAD training articles (non-English queries, English passages) and tests on the
held-out articles (``configs/xquad.yaml``). The shared stages (prepare, QG, warm-up, mining,
teacher scoring, generation) run once through the pipeline; then three students are trained
from the warm-up model with the same data and seed:

- ``contrastive``: alpha = beta = 0;
- ``kd``: + alpha * KD from the QG teacher's scores;
- ``kd_align``: + beta * the cross-lingual alignment loss on QG-generated queries.

Reported per variant: MRR@10 and Recall@10 X->en (English test passages), the same over a
pooled multilingual corpus (test passages in every query language and English), and
parallel-query alignment accuracy@1 (each query's nearest English test query is its
translation). Nothing is tuned on the test articles.

    python benchmarks/quality.py [--config configs/xquad.yaml] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qgscale import config as config_mod  # noqa: E402
from qgscale import pipeline, storage  # noqa: E402
from qgscale.data import readers  # noqa: E402
from qgscale.layout import Layout  # noqa: E402

VARIANTS = {"contrastive": (0.0, 0.0), "kd": (None, 0.0), "kd_align": (None, None)}


def variant_cfg(cfg, alpha, beta):
    loss = cfg.distill.loss.model_copy(update={
        "alpha": cfg.distill.loss.alpha if alpha is None else alpha,
        "beta": cfg.distill.loss.beta if beta is None else beta})
    return cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"loss": loss})})


def evaluate(cfg, model_uri: str, tag: str, out_uri: str) -> dict:
    """Encode + index the test corpus with ``model_uri``; metrics of the test queries."""
    from qgscale.eval.evaluate import run_eval
    from qgscale.index.build import run_build
    from qgscale.index.encode import run_encode

    lay = Layout(cfg)
    key = storage.config_hash([storage.fingerprint(model_uri), cfg.index])
    emb, index = cfg.uri("index", tag, "embeddings"), cfg.uri("index", tag, "faiss")
    run_encode(cfg, model_uri, lay.data("test", "corpus"), emb, key)
    run_build(cfg, emb, index, key)
    return run_eval(cfg, model_uri, index, lay.data_root, out_uri, ["test"])["test"]


def alignment_accuracy(model_uri: str, langs: list[str]) -> dict[str, float]:
    """Accuracy@1 of finding a test question's English translation among all English test
    questions by embedding similarity (XQuAD questions are parallel across languages)."""
    from qgscale.index.encode import load_dual_encoder

    tables = readers.read_xquad(readers.bundled("xquad"), ["en", *langs], ["en"])
    by_lang: dict[str, dict[str, str]] = {}
    for q in tables["test/queries"]:
        lang, qa_id = q["qid"].split(":", 1)
        by_lang.setdefault(lang, {})[qa_id] = q["text"]
    enc = load_dual_encoder(model_uri)
    ids = sorted(by_lang["en"])
    en = enc.encode_queries([by_lang["en"][i] for i in ids], 64).float().numpy()
    out = {}
    for lang in langs:
        x = enc.encode_queries([by_lang[lang][i] for i in ids], 64).float().numpy()
        out[lang] = float(np.mean(np.argmax(x @ en.T, axis=1) == np.arange(len(ids))))
    out["macro"] = float(np.mean([out[lang] for lang in langs]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "xquad.yaml"))
    ap.add_argument("--quick", action="store_true", help="2 languages, few steps (smoke run)")
    ap.add_argument("--out", default="bench-out/quality.json")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = list(args.set)
    if args.quick:
        overrides += ["data.query_langs=[de, zh]", "run.root=runs/quality-quick",
                      "qg.max_steps=20", "warmup.max_steps=20", "distill.max_steps=20"]
    cfg = config_mod.load(args.config, overrides)
    langs = [x for x in cfg.data.query_langs or readers.XQUAD_LANGS if x != "en"]
    t0 = time.time()
    for stage in ("prepare", "train-qg", "warmup", "index", "mine", "score", "generate"):
        pipeline.run(cfg, only=stage)
    pooled = cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"root": storage.join(cfg.run.root, "pooled")}),
        "data": cfg.data.model_copy(update={"corpus_langs": sorted({"en", *langs})})})
    pipeline.run(pooled, only="prepare")

    results = {}
    for name, (alpha, beta) in VARIANTS.items():
        vcfg = variant_cfg(cfg, alpha, beta)
        out = cfg.uri("quality", name)
        from qgscale.train.trainer import run_train_distill

        lay = Layout(cfg)
        run_train_distill(
            vcfg, out_uri=out, key=storage.config_hash(vcfg.distill), init_uri=lay.model("warmup"),
            candidates_uri=lay.candidates, scores_uri=lay.scores,
            generated_uri=lay.generated if vcfg.distill.loss.beta else None,
            examples_uri=lay.mined_train, **lay.training_data())
        model = storage.join(out, "model")
        x_en = evaluate(cfg, model, f"quality-{name}", storage.join(out, "eval-x-en"))
        multi = evaluate(pooled, model, f"quality-{name}", storage.join(out, "eval-pooled"))
        xm, pm = x_en["query_langs_macro"], multi["query_langs_macro"]
        results[name] = {
            "loss": {"alpha": vcfg.distill.loss.alpha, "beta": vcfg.distill.loss.beta},
            "mrr10_x_en": xm["mrr@10"], "recall10_x_en": xm["recall@10"],
            "mrr10_pooled": pm["mrr@10"], "recall10_pooled": pm["recall@10"],
            "per_lang_x_en": {k: v["mrr@10"] for k, v in x_en["query_langs"].items()},
            "align_acc1": alignment_accuracy(model, langs)["macro"],
        }
    report = {**results, "seed": cfg.run.seed, "langs": langs, "quick": args.quick,
              "seconds": round(time.time() - t0, 1), "config": args.config}
    cols = ["mrr10_x_en", "recall10_x_en", "mrr10_pooled", "recall10_pooled", "align_acc1"]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
