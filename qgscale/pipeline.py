"""``qgscale run``: the whole method as a sequence of resumable stages.

prepare -> train QG -> warm-up DE -> encode + index -> mine candidates -> cross-lingual query
generation -> teacher scoring (of mined and, optionally, generated queries) -> distill DE ->
re-encode + index -> eval.

Each stage writes under ``run.root`` and returns at once when its manifest carries the same
config hash; inside a stage, finished shards are skipped. A crashed run therefore resumes at
the stage and shard where it stopped. ``--from STAGE`` starts at a stage (earlier outputs must
exist), ``--only STAGE`` runs one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qgscale import storage
from qgscale.config import Config

log = logging.getLogger("qgscale")


def split_uri(cfg: Config, split: str, kind: str) -> str:
    """``data/<split>/<kind>`` when the dataset is split (XQuAD), else ``data/<kind>``."""
    return storage.first_existing(cfg.uri("data", split, kind), cfg.uri("data", kind))


def train_inputs(cfg: Config) -> dict[str, str]:
    """The training split's queries, corpus and qrels, as the trainers' keyword arguments."""
    return {f"{kind}_uri": split_uri(cfg, "train", kind) for kind in ("queries", "corpus", "qrels")}


def model_uri(cfg: Config, stage: str) -> str:
    return cfg.uri("train", stage, "model")


def _prepare(cfg: Config) -> dict:
    from qgscale.data.prepare import run_prepare

    return run_prepare(cfg)


def _train_qg(cfg: Config) -> dict:
    from qgscale.train.trainer import run_train_qg

    return run_train_qg(cfg)


def _warmup(cfg: Config) -> dict:
    from qgscale.train.trainer import run_train_warmup

    return run_train_warmup(cfg, **train_inputs(cfg))


def index_model(cfg: Config, stage: str, split: str) -> dict:
    """Encode the ``split`` corpus with the ``stage`` model and build its index."""
    from qgscale.index.build import run_build
    from qgscale.index.encode import run_encode

    tag = f"{stage}-{split}"
    run_encode(cfg, model_uri(cfg, stage), tag=tag, corpus_uri=split_uri(cfg, split, "corpus"))
    return run_build(cfg, tag=tag)


def _index0(cfg: Config) -> dict:
    return index_model(cfg, "warmup", "train")


def _mine(cfg: Config) -> dict:
    from qgscale.index.mine import run_mine

    return run_mine(cfg, model_uri(cfg, "warmup"), tag="warmup-train",
                    queries_uri=split_uri(cfg, "train", "queries"),
                    qrels_uri=split_uri(cfg, "train", "qrels"), out_uri=cfg.uri("mine"))


def _score(cfg: Config) -> dict:
    from qgscale.teacher.scoring import run_score

    return run_score(cfg)


def _generate(cfg: Config) -> dict:
    from qgscale.teacher.generation import run_generate

    return run_generate(cfg)


def _distill(cfg: Config) -> dict:
    from qgscale.train.trainer import run_train_distill

    return run_train_distill(cfg, **train_inputs(cfg))


STUDENTS = ("warmup", "distill")


def _index1(cfg: Config) -> dict:
    return {f"{s}-{split}": index_model(cfg, s, split) for s in STUDENTS
            for split in cfg.eval.splits}


def _eval(cfg: Config) -> dict:
    """Each student on each eval split, against the index of that split's corpus."""
    from qgscale.eval.evaluate import run_eval

    out: dict[str, dict] = {}
    for stage in STUDENTS:
        for split in cfg.eval.splits:
            one = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"splits": [split]})})
            out.setdefault(stage, {}).update(run_eval(
                one, model_uri=model_uri(cfg, stage),
                index_uri=cfg.uri("index", f"{stage}-{split}", "faiss"),
                out_uri=cfg.uri("eval", stage)))
    return out


def summary_table(results: dict[str, dict], metrics: tuple[str, ...] = (
        "mrr@10", "recall@1", "recall@10", "ndcg@10")) -> str:
    """Markdown table: macro metrics of each student on each split, side by side."""
    rows = ["| student | split | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics)]
    for stage, by_split in results.items():
        for split, r in by_split.items():
            macro = r.get("query_langs_macro") or r.get("macro") or {}
            cells = [f"{macro[m]:.4f}" if isinstance(macro.get(m), float) else "-"
                     for m in metrics]
            rows.append(f"| {stage} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass
class Stage:
    name: str
    fn: Callable[[Config], Any]
    help: str


STAGES = [
    Stage("prepare", _prepare, "raw data -> canonical parquet"),
    Stage("train-qg", _train_qg, "fine-tune the query generator (teacher)"),
    Stage("warmup", _warmup, "contrastive warm-up of the dual encoder"),
    Stage("index", _index0, "encode the training corpus and build its index"),
    Stage("mine", _mine, "retrieve candidates and hard negatives for training queries"),
    Stage("generate", _generate, "teacher-generated queries in other languages"),
    Stage("score", _score, "teacher scores log P(q|p)/|q| for every candidate pair"),
    Stage("distill", _distill, "contrastive + KD + alignment training of the dual encoder"),
    Stage("reindex", _index1, "encode and index the evaluation corpus with both students"),
    Stage("eval", _eval, "metrics of the warm-up and the distilled student"),
]
STAGE_NAMES = [s.name for s in STAGES]


def run(cfg: Config, start: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the stages in order (or from ``start``, or ``only`` one); returns their results."""
    for name in (start, only):
        if name and name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    from qgscale import raycluster

    raycluster.connect(cfg.ray)
    stages = STAGES
    if only:
        stages = [s for s in STAGES if s.name == only]
    elif start:
        stages = STAGES[STAGE_NAMES.index(start):]
    results: dict[str, Any] = {}
    for stage in stages:
        t0 = time.time()
        log.info("stage %s: %s", stage.name, stage.help)
        results[stage.name] = stage.fn(cfg)
        log.info("stage %s done in %.1f s", stage.name, time.time() - t0)
    return results
