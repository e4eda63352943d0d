"""The quality experiment: contrastive vs + KD vs + KD + alignment, from the same warm-up
weights, over several seeds.

Trains on XQuAD training articles (non-English queries, English passages) and tests on the
held-out articles. The shared stages (prepare, bm25-eval, train-qg, warmup, index, mine,
qg-rank, generate, score) run once through the pipeline; the untrained starting checkpoint
(zero-shot), the warm-up student and BM25 are evaluated, and the teacher reranks the warm-up
student's top-k (the ``rerank`` stage's function). Then, for every seed (``run.seed`` of the
distillation: data order, dropout, negatives' draw), three students are trained from the
warm-up model with the same data and the same number of steps (the ``distill`` stage's
function, ``distill.*`` settings):

- ``contrastive``: alpha = beta = 0;
- ``kd``: + alpha * KD from the teacher's scores;
- ``kd_align``: + beta * the cross-lingual alignment loss on QG-generated queries.

Reported per variant: mean, standard deviation and per-seed values of MRR@10 X -> en macro
(English test passages) and of parallel-query alignment accuracy@1 (each test question's
nearest English test question is its translation), and the paired differences per seed
(kd - contrastive, kd_align - kd) with their standard errors. Nothing is tuned on the test
articles. A finished (variant, seed) is kept under ``<run.root>/quality/`` and not rerun.

    python benchmarks/quality.py [--config configs/xquad.yaml] [--seeds 13,14,15]
                                 [--pooled] [--tiny] [--out FILE] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qgscale import config as config_mod  # noqa: E402
from qgscale import pipeline, storage  # noqa: E402
from qgscale.data import readers  # noqa: E402
from qgscale.layout import Layout  # noqa: E402

VARIANTS = {"contrastive": (0.0, 0.0), "kd": (None, 0.0), "kd_align": (None, None)}
PAIRS = (("kd", "contrastive"), ("kd_align", "kd"))  # paired differences reported
SHARED = ("prepare", "bm25-eval", "train-qg", "warmup", "index", "mine", "qg-rank",
          "generate", "score")
SPLIT = "test"

# --tiny: tiny random models, 2 seeds: the machinery in minutes. The test suite's pipeline
# tests run the same config (tests/conftest.py::tiny_run), and the quality test runs on a copy
# of that run, so only the variants train there.
TINY = {
    "run": {"name": "tiny", "seed": 3, "root": "runs/tiny"},
    "ray": {"num_cpus": 2},
    "data": {"format": "xquad", "query_langs": ["de"], "corpus_langs": ["en"]},  # + input
    "qg": {"model": {"init": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64,
                              "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4},
                     "tokenizer": "xquad-tokenizer:2000"},
           "max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
           "max_query_len": 24, "checkpoint_every": 1000},
    "qg_rank": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "n_negatives": 2,
                "gen_weight": 0.5, "checkpoint_every": 1000},
    "encoder": {"model": {"init": {"model_type": "bert", "hidden_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 4,
                                   "intermediate_size": 64},
                          "tokenizer": "xquad-tokenizer:2000"},
                "pooling": "mean", "normalize": True, "temperature": 0.1},
    "warmup": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
               "max_query_len": 24, "checkpoint_every": 1000,
               "loss": {"alpha": 0.0, "beta": 0.0}},
    "distill": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "max_passage_len": 96,
                "max_query_len": 24, "checkpoint_every": 1000,
                "loss": {"alpha": 1.0, "beta": 0.5, "n_candidates": 4}},
    "teacher": {"score": {"num_actors": 1, "shard_pairs": 1500, "precision": "fp32"},
                "generate": {"langs": ["en"], "num_queries": 1, "max_new_tokens": 8},
                "rerank_k": 10},
    "index": {"encode": {"cpus_per_actor": 1}, "build": {"factory": "Flat"}},
    "mine": {"top_k": 4, "n_negatives": 2},
    "eval": {"k": [1, 5, 10], "top_k": 10, "splits": [SPLIT]},
}
TINY_SEEDS = [1, 2]


def write_tiny_config(path: str | Path, root: str | None = None) -> str:
    """Write the ``--tiny`` config (:data:`TINY`, the bundled XQuAD; ``run.root`` = ``root``
    when given) as YAML to ``path``."""
    raw = dict(TINY, data={**TINY["data"], "input": readers.bundled("xquad")},
               run={**TINY["run"], **({"root": root} if root else {})})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(raw))
    return str(path)


def variant_cfg(cfg, alpha, beta, seed: int):
    """``cfg`` with the variant's KD / alignment weights and the distillation seed."""
    loss = cfg.distill.loss.model_copy(update={
        "alpha": cfg.distill.loss.alpha if alpha is None else alpha,
        "beta": cfg.distill.loss.beta if beta is None else beta})
    return cfg.model_copy(update={
        "distill": cfg.distill.model_copy(update={"loss": loss}),
        "run": cfg.run.model_copy(update={"seed": seed})})


def evaluate(cfg, model_uri: str, tag: str, out_uri: str) -> dict:
    """Encode + index the test corpus with ``model_uri``; metrics of the test queries (the
    index and eval stages' functions). Reports in ``out_uri/test/`` (``run.parquet``: the
    ranked lists)."""
    from qgscale.eval.evaluate import run_eval
    from qgscale.index.build import run_build
    from qgscale.index.encode import run_encode

    lay = Layout(cfg)
    key = storage.config_hash([storage.fingerprint(model_uri), cfg.index])
    emb, index = cfg.uri("index", tag, "embeddings"), cfg.uri("index", tag, "faiss")
    run_encode(cfg, model_uri, lay.data(SPLIT, "corpus"), emb, key)
    run_build(cfg, emb, index, key)
    return run_eval(cfg, model_uri, index, lay.data_root, out_uri, [SPLIT])[SPLIT]


def macro_mrr10(metrics: dict) -> float:
    """MRR@10 macro-averaged over the query languages (X -> en) of one split's metrics."""
    return metrics["query_langs_macro"]["mrr@10"]


def alignment_accuracy(model_uri: str, langs: list[str], xquad: str) -> dict[str, float]:
    """Accuracy@1 of finding a test question's English translation among all English test
    questions by embedding similarity (XQuAD questions are parallel across languages)."""
    from qgscale.index.encode import load_dual_encoder

    tables = readers.read_xquad(xquad, ["en", *langs], ["en"])
    by_lang: dict[str, dict[str, str]] = {}
    for q in tables[f"{SPLIT}/queries"]:
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


def stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "per_seed": list(values)}


def paired(a: list[float], b: list[float]) -> dict:
    """Per-seed differences a - b: mean, std, standard error and mean / standard error."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    out = stats(d)
    out["se"] = out["std"] / math.sqrt(len(d))
    out["t"] = out["mean"] / out["se"] if out["se"] > 0 else None
    return out


def student_row(cfg, model_uri: str, tag: str, out_uri: str, langs: list[str],
                pooled=None) -> dict:
    """Metrics of one student: X -> en (and pooled) MRR@10 / R@10, alignment acc@1."""
    x_en = evaluate(cfg, model_uri, tag, storage.join(out_uri, "eval-x-en"))
    xm = x_en["query_langs_macro"]
    row = {"mrr10_x_en": xm["mrr@10"], "recall10_x_en": xm["recall@10"],
           "per_lang_x_en": {k: v["mrr@10"] for k, v in x_en["query_langs"].items()},
           "align_acc1": alignment_accuracy(model_uri, langs, cfg.data.input)["macro"]}
    if pooled is not None:
        pm = evaluate(pooled, model_uri, tag, storage.join(out_uri, "eval-pooled"))
        row.update(mrr10_pooled=pm["query_langs_macro"]["mrr@10"],
                   recall10_pooled=pm["query_langs_macro"]["recall@10"])
    return row


def shared_rows(cfg, langs: list[str], pooled) -> dict:
    """BM25, the starting checkpoint (zero-shot), the warm-up student, and the teacher's
    reranking of the warm-up student's top-k on the test articles; kept in
    ``quality/shared.json`` with the fingerprints of those models (read back while they are
    unchanged, e.g. when seeds are added)."""
    from qgscale.eval.evaluate import evaluate_baseline
    from qgscale.eval.rerank import run_rerank

    lay = Layout(cfg)

    def shared_key() -> str:
        return storage.config_hash([storage.fingerprint(u) for u in (
            lay.model("init"), lay.model("warmup"), lay.teacher_model().name_or_path,
            lay.bm25_eval())] + [pooled is not None, cfg.eval, cfg.teacher.rerank_k])

    done = cfg.uri("quality", "shared.json")
    if storage.exists(done) and storage.read_json(done).get("key") == shared_key():
        return storage.read_json(done)["rows"]
    out = {}
    if cfg.bm25.baseline:
        bm25 = evaluate_baseline(cfg, storage.join(lay.bm25_eval(SPLIT), "run.parquet"),
                                 lay.data_root, SPLIT, lay.data(SPLIT, "corpus"),
                                 cfg.uri("quality", "bm25"))
        out["bm25_mrr10"] = macro_mrr10(bm25)
    for name, student in (("zero_shot", "init"), ("warmup", "warmup")):
        out[name] = student_row(cfg, lay.model(student), f"quality-{name}",
                                cfg.uri("quality", name), langs, pooled)
    run_uri = storage.join(cfg.uri("quality", "warmup", "eval-x-en"), SPLIT, "run.parquet")
    key = storage.config_hash([storage.fingerprint(run_uri),
                               storage.fingerprint(lay.teacher_model().name_or_path)])
    rr = run_rerank(cfg, lay.teacher_model(), run_uri, lay.data_root, SPLIT,
                    cfg.uri("quality", "rerank"), key, corpus_uri=lay.data(SPLIT, "corpus"))
    out["rerank"] = {"k": rr["rerank_k"], "teacher_mrr10": rr["teacher"]["macro"]["mrr@10"],
                     "student_mrr10_same_lists": rr["student"]["macro"]["mrr@10"]}
    storage.write_json(done, {"key": shared_key(), "rows": out})
    return out


def variant_key(cfg, name: str, seed: int) -> str:
    """What a (variant, seed) run depends on: its distill settings and seed, and the
    fingerprints of its inputs (the warm-up weights, candidates, hard negatives, teacher
    scores, generated queries), so that a re-run pipeline stage retrains it."""
    alpha, beta = VARIANTS[name]
    lay = Layout(cfg)
    inputs = [lay.model("warmup"), lay.candidates, lay.mined_train, lay.scores,
              *([lay.generated] if beta else [])]
    return storage.config_hash([variant_cfg(cfg, alpha, beta, seed).distill, seed,
                                *(storage.fingerprint(u) for u in inputs)])


def run_variant(cfg, name: str, seed: int, langs: list[str], pooled) -> dict:
    """Distil one (variant, seed) from the warm-up weights and evaluate it; kept in
    ``quality/<name>-s<seed>/result.json`` (a finished one with the same
    :func:`variant_key` is read back, not rerun; one with another key is removed first)."""
    from qgscale.train.trainer import run_train_distill

    alpha, beta = VARIANTS[name]
    vcfg = variant_cfg(cfg, alpha, beta, seed)
    out = cfg.uri("quality", f"{name}-s{seed}")
    done, key = storage.join(out, "result.json"), variant_key(cfg, name, seed)
    mark = storage.join(out, "_variant_key.json")
    if storage.exists(done) and storage.read_json(done).get("key") == key:
        return storage.read_json(done)
    if storage.exists(out) and not (storage.exists(mark)
                                    and storage.read_json(mark)["key"] == key):
        storage.remove(out, recursive=True)  # another warm-up, teacher or settings
    storage.write_json(mark, {"key": key})
    lay = Layout(cfg)
    t0 = time.time()
    summary = run_train_distill(
        vcfg, out_uri=out, key=key,
        init_uri=lay.model("warmup"), candidates_uri=lay.candidates, scores_uri=lay.scores,
        generated_uri=lay.generated if vcfg.distill.loss.beta else None,
        examples_uri=lay.mined_train, **lay.training_data())
    train_s = time.time() - t0
    row = student_row(cfg, storage.join(out, "model"), f"quality-{name}-s{seed}", out, langs,
                      pooled)
    row.update(key=key, seed=seed, train_s=round(train_s, 1),
               final_metrics=summary.get("final_metrics"),
               loss={"alpha": vcfg.distill.loss.alpha, "beta": vcfg.distill.loss.beta})
    storage.write_json(done, row)
    return row


def report(shared: dict, runs: dict[str, list[dict]]) -> dict:
    """The JSON of the experiment: shared rows, per-variant statistics, paired differences."""
    metrics = ("mrr10_x_en", "align_acc1", "recall10_x_en", "mrr10_pooled")
    variants = {name: {m: stats([r[m] for r in rows]) for m in metrics if m in rows[0]}
                for name, rows in runs.items()}
    diffs = {f"{a}-{b}": {m: paired(variants[a][m]["per_seed"], variants[b][m]["per_seed"])
                          for m in ("mrr10_x_en", "align_acc1")} for a, b in PAIRS}
    return {"zero_shot_mrr10": shared["zero_shot"]["mrr10_x_en"],
            "warmup_mrr10": shared["warmup"]["mrr10_x_en"],
            "teacher_rerank_mrr10": shared["rerank"]["teacher_mrr10"],
            "bm25_mrr10": shared.get("bm25_mrr10"),
            "zero_shot_align_acc1": shared["zero_shot"]["align_acc1"],
            "warmup_align_acc1": shared["warmup"]["align_acc1"],
            "rerank": shared["rerank"], "shared": shared,
            "variants": variants, "paired_differences": diffs, "runs": runs}


def table(res: dict) -> str:
    """Markdown: one row per model, mean +- std over seeds."""
    rows = ["| model | MRR@10 X->en | align acc@1 |", "|---|---|---|"]
    if res.get("bm25_mrr10") is not None:
        rows.append(f"| BM25 | {res['bm25_mrr10']:.4f} | |")
    rows.append(f"| zero-shot (init) | {res['zero_shot_mrr10']:.4f} | "
                f"{res['zero_shot_align_acc1']:.4f} |")
    rows.append(f"| warm-up | {res['warmup_mrr10']:.4f} | {res['warmup_align_acc1']:.4f} |")
    rows.append(f"| teacher reranking the warm-up top-{res['rerank']['k']} | "
                f"{res['teacher_rerank_mrr10']:.4f} | |")
    for name, v in res["variants"].items():
        m, a = v["mrr10_x_en"], v["align_acc1"]
        rows.append(f"| {name} | {m['mean']:.4f} ± {m['std']:.4f} | "
                    f"{a['mean']:.4f} ± {a['std']:.4f} |")
    for pair, d in res["paired_differences"].items():
        m, a = d["mrr10_x_en"], d["align_acc1"]
        rows.append(f"| {pair} (paired) | {m['mean']:+.4f} (se {m['se']:.4f}) | "
                    f"{a['mean']:+.4f} (se {a['se']:.4f}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "xquad.yaml"))
    ap.add_argument("--seeds", default="13,14,15", help="distillation seeds (comma-separated)")
    ap.add_argument("--pooled", action="store_true",
                    help="also evaluate over a pooled corpus (test passages in every query "
                         "language and English)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random models, 2 seeds (the test's smoke run)")
    ap.add_argument("--out", default="bench-out/quality.json")
    ap.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    config = args.config
    if args.tiny:
        seeds = TINY_SEEDS if args.seeds == ap.get_default("seeds") else seeds
        config = write_tiny_config(Path(args.out).with_suffix(".tiny.yaml"))
    cfg = config_mod.load(config, args.set)
    langs = [x for x in cfg.data.query_langs or readers.XQUAD_LANGS if x != "en"]
    load0, t0 = os.getloadavg(), time.time()
    for stage in SHARED:
        pipeline.run(cfg, only=stage)
    pooled = None
    if args.pooled:
        pooled = cfg.model_copy(update={
            "run": cfg.run.model_copy(update={"root": storage.join(cfg.run.root, "pooled")}),
            "data": cfg.data.model_copy(update={"corpus_langs": sorted({"en", *langs})})})
        pipeline.run(pooled, only="prepare")
    shared = shared_rows(cfg, langs, pooled)
    shared_s = time.time() - t0
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in seeds:  # seed-major: an interrupted run has whole seeds for every variant
        for name in VARIANTS:
            runs[name].append(run_variant(cfg, name, seed, langs, pooled))
    res = report(shared, runs)
    lay = Layout(cfg)
    stage_s = {s: round((pipeline.read_record(lay, s) or {}).get("wall_s") or 0, 1)
               for s in SHARED}
    res.update(
        seeds=seeds, langs=langs, tiny=args.tiny, config=args.config if not args.tiny else
        "--tiny", overrides=args.set,
        steps={"qg": cfg.qg.max_steps, "qg_rank": cfg.qg_rank.max_steps,
               "warmup": cfg.warmup.max_steps, "distill": cfg.distill.max_steps},
        distill_loss=cfg.distill.loss.model_dump(),
        seconds=round(time.time() - t0, 1), shared_seconds=round(shared_s, 1),
        shared_stage_seconds=stage_s,
        load_average={"start": [round(x, 2) for x in load0],
                      "end": [round(x, 2) for x in os.getloadavg()]})
    print(table(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
