"""``qgscale run``: the method as a graph of stages, and the one runner that decides what runs.

prepare -> bm25 -> bm25-eval -> train-qg -> warmup -> index -> mine -> qg-rank (the
teacher's ranking fine-tune on the mined hard negatives) -> generate -> score -> distill ->
reindex -> eval -> rerank (the teacher's reranking of the warm-up student's top-k: is the
teacher better?)

``bm25`` makes the training examples from answers (XOR-TyDi, MKQA: data with answers and no
gold passages) and is a no-op for data with its own positives; only then do the training
stages read it. ``bm25-eval`` computes the BM25 run of every eval split, the first row of
every eval table. Two stages, not one, so that a change of the eval splits reruns the cheap
baseline and the eval, and not every training stage.

Each :class:`Stage` names its upstream stages, the config sections it reads, the raw inputs
outside the run (data files, starting checkpoints) and the outputs downstream stages read. Its
**key** hashes those config values, the raw inputs' fingerprints and the upstream outputs'
fingerprints (:func:`qgscale.storage.fingerprint`: paths, sizes, modification times), so a
change anywhere upstream, in the config or in a file rewritten at the same path, makes every
descendant stale, and nothing else. The runner alone decides:

- ``done``: a record under ``_stages/`` with the same key, outputs present: skipped;
- ``stale``: the key changed: the stage's folders are cleared and it runs from scratch (a
  training stage starts a fresh Ray Train run);
- ``interrupted``: started with the same key and not finished: it runs again and resumes
  (finished shards are skipped, training restarts from its last checkpoint);
- ``missing``: never run.

``qgscale run CONFIG --dry-run`` prints these states and runs nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qgscale import logs, storage
from qgscale.config import Config, key_values
from qgscale.errors import ConfigError, MissingInputError
from qgscale.layout import BASELINE, STUDENTS, Layout, answer_positives

log = logging.getLogger("qgscale")


# ------------------------------------------------------------------------ stage functions
def _prepare(cfg: Config, lay: Layout, key: str) -> dict:
    from qgscale.data.prepare import run_prepare

    return run_prepare(cfg.data, lay.data_root, key)


def _bm25(cfg: Config, lay: Layout, key: str) -> dict:
    """Answer-match training examples over BM25's top-k (when :func:`answer_positives`)."""
    from qgscale.retrieval.sharded import run_bm25_train

    if not answer_positives(cfg):
        return storage.write_manifest(
            lay.bm25_train, key, skipped=f"bm25.positives={cfg.bm25.positives}, data.format="
            f"{cfg.data.format}: the training data's own positives are used")
    return run_bm25_train(cfg, lay.data("train", "queries"), lay.data("train", "answers"),
                          lay.data("train", "corpus"), lay.bm25_train, key)


def _bm25_eval(cfg: Config, lay: Layout, key: str) -> dict:
    """The BM25 baseline's run of every eval split over that split's corpus."""
    from qgscale.eval.evaluate import _queries_uri
    from qgscale.retrieval.sharded import run_bm25_eval

    if not cfg.bm25.baseline:
        return storage.write_manifest(lay.bm25_eval(), key, skipped="bm25.baseline: false")
    data = lay.eval_data()
    out = {split: storage.read_manifest(lay.bm25_eval(split))  # a split done before a crash
           if storage.stage_done(lay.bm25_eval(split), key) else
           run_bm25_eval(cfg, _queries_uri(data, split), lay.data(split, "corpus"),
                         lay.bm25_eval(split), key)
           for split in cfg.eval.splits}
    storage.write_manifest(lay.bm25_eval(), key, splits=list(out))
    return out


def _train_qg(cfg: Config, lay: Layout, key: str) -> dict:
    from qgscale.train.trainer import run_train_qg

    return run_train_qg(cfg, out_uri=lay.train_dir("qg"), key=key, **lay.training_data())


def _warmup(cfg: Config, lay: Layout, key: str) -> dict:
    from qgscale.train.trainer import run_train_warmup

    return run_train_warmup(cfg, out_uri=lay.train_dir("warmup"), key=key,
                            **lay.training_data(examples=True))


def index_model(cfg: Config, lay: Layout, student: str, split: str, key: str) -> dict:
    """Encode the ``split`` corpus with the ``student`` model and build its index."""
    from qgscale.index.build import run_build
    from qgscale.index.encode import run_encode

    run_encode(cfg, lay.model(student), lay.data(split, "corpus"),
               lay.embeddings(student, split), key)
    return run_build(cfg, lay.embeddings(student, split), lay.faiss(student, split), key)


def _index(cfg: Config, lay: Layout, key: str) -> dict:
    return index_model(cfg, lay, "warmup", "train", key)


def _mine(cfg: Config, lay: Layout, key: str) -> dict:
    """Hard negatives from the warm-up index; with answer-match positives (the bm25 stage),
    passages that contain an answer are not negatives."""
    from qgscale.index.mine import AnswerFilter, run_mine

    split = cfg.mine.split
    answers = (AnswerFilter.read(lay.data(split, "answers"), lay.data("train", "corpus"),
                                 cfg.bm25.match, cfg.bm25) if answer_positives(cfg) else None)
    return run_mine(cfg, lay.model("warmup"), lay.faiss("warmup", "train"),
                    lay.data(split, "queries"), lay.train("qrels", split), lay.mine_dir, key,
                    answers)


def _qg_rank(cfg: Config, lay: Layout, key: str) -> dict:
    """The teacher's ranking fine-tune; with ``qg_rank.enabled: false`` nothing (the QG
    itself is then the teacher)."""
    if not cfg.qg_rank.enabled:
        return {"enabled": False}
    from qgscale.train.trainer import run_train_qg_rank

    return run_train_qg_rank(cfg, out_uri=lay.train_dir("qg-rank"), key=key,
                             qg_model=lay.qg_model(), examples_uri=lay.mined_train,
                             queries_uri=lay.data("train", "queries"),
                             corpus_uri=lay.data("train", "corpus"))


def _generate(cfg: Config, lay: Layout, key: str) -> dict:
    """Generated queries come from the generation-only QG, not the ranking fine-tuned
    teacher: its one objective is generation, and generation then does not depend on the
    student (warm-up, index, mine) nor rerun when the ranking fine-tune changes."""
    from qgscale.teacher.generation import run_generate

    positives = cfg.teacher.generate.passages == "positives"
    return run_generate(cfg, lay.qg_model(), lay.data("train", "corpus"),
                        lay.train("qrels") if positives else None, lay.generated, key)


def _score(cfg: Config, lay: Layout, key: str) -> dict:
    from qgscale.teacher.scoring import run_score

    generated = lay.generated if cfg.distill.loss.kd_on_generated else None
    return run_score(cfg, lay.teacher_model(), candidates_uri=lay.candidates,
                     queries_uri=lay.data("train", "queries"),
                     corpus_uri=lay.data("train", "corpus"), out_uri=lay.scores, key=key,
                     generated_uri=generated, qrels_uri=lay.train("qrels"),
                     pairs_uri=lay.generated_pairs)


def _distill(cfg: Config, lay: Layout, key: str) -> dict:
    from qgscale.train.trainer import run_train_distill

    return run_train_distill(
        cfg, out_uri=lay.train_dir("distill"), init_uri=lay.model("warmup"),
        examples_uri=lay.mined_train, candidates_uri=lay.candidates, scores_uri=lay.scores,
        generated_uri=lay.generated if cfg.distill.loss.beta else None, key=key,
        **lay.training_data())


def reindexed(cfg: Config, lay: Layout) -> list[tuple[str, str]]:
    """(student, split) pairs the reindex stage encodes: every student on every eval split's
    corpus, except the warm-up student's index of the training corpus (the index stage's)."""
    pairs: dict[str, tuple[str, str]] = {}
    for student in STUDENTS:
        for split in cfg.eval.splits:
            if lay.index_dir(student, split) != lay.index_dir("warmup", "train"):
                pairs.setdefault(lay.index_dir(student, split), (student, split))
    return list(pairs.values())


def _reindex(cfg: Config, lay: Layout, key: str) -> dict:
    return {f"{s}-{split}": index_model(cfg, lay, s, split, key)
            for s, split in reindexed(cfg, lay)}


def _eval(cfg: Config, lay: Layout, key: str) -> dict:
    """Each student (and the untrained starting checkpoint) on each eval split, against the
    index of that split's corpus; per split a side-by-side table and chart of all of them."""
    from qgscale.eval.evaluate import (
        chart_metric,
        comparison_chart,
        comparison_table,
        evaluate_baseline,
        run_eval,
    )

    out: dict[str, dict] = {}
    data = lay.eval_data()
    for split in cfg.eval.splits:
        if cfg.bm25.baseline:  # BM25 first: the row every table starts from
            out.setdefault(BASELINE, {})[split] = evaluate_baseline(
                cfg, storage.join(lay.bm25_eval(split), "run.parquet"), data, split,
                lay.data(split, "corpus"), lay.eval_dir(BASELINE))
        for student in STUDENTS:
            out.setdefault(student, {}).update(run_eval(
                cfg, lay.model(student), lay.faiss(student, split), data,
                lay.eval_dir(student), [split]))
        by_student = {s: out[s][split] for s in _compared(cfg)}
        metric = chart_metric(next(iter(by_student.values())), cfg.eval.chart_metric)
        storage.write_bytes(lay.comparison(split, "png"), comparison_chart(by_student, metric))
        storage.write_bytes(lay.comparison(split, "md"),
                            comparison_table(by_student, metric).encode())
    return out


def _rerank(cfg: Config, lay: Layout, key: str) -> dict:
    """The teacher's reranking of the warm-up student's top-k on each eval split."""
    from qgscale.eval.rerank import run_rerank

    data = lay.eval_data()
    return {split: run_rerank(cfg, lay.teacher_model(),
                              storage.join(lay.eval_dir("warmup"), split, "run.parquet"),
                              data, split, lay.rerank_dir(split), key,
                              corpus_uri=lay.data(split, "corpus"))
            for split in cfg.eval.splits}


# ---------------------------------------------------------------------------- the graph
def _compared(cfg: Config) -> tuple[str, ...]:
    """What every eval table compares: BM25 (``bm25.baseline``) and the students."""
    return ((BASELINE,) if cfg.bm25.baseline else ()) + STUDENTS


def _positives(cfg: Config) -> tuple[str, ...]:
    """The stages the training positives come from."""
    return ("prepare", "bm25") if answer_positives(cfg) else ("prepare",)


def _raw_eval_data(cfg: Config) -> list[str]:
    return [cfg.eval.data] if cfg.eval.data else []

def _model_source(model: Any) -> list[str]:
    return [model.name_or_path] if model is not None and model.name_or_path else []


def _qg_inputs(cfg: Config) -> tuple[str, ...]:
    """The stage that provides the query generator (none with an external teacher.model)."""
    return () if cfg.teacher.model is not None else ("train-qg",)


def _teacher_inputs(cfg: Config) -> tuple[str, ...]:
    """The stages that provide the scoring teacher: the QG, then its ranking fine-tune."""
    return (*_qg_inputs(cfg), *(("qg-rank",) if cfg.qg_rank.enabled else ()))


@dataclass(frozen=True)
class Stage:
    """A node of the graph: what it reads, what it writes, and the function that does it."""

    name: str
    help: str
    run: Callable[[Config, Layout, str], dict]
    sections: tuple[str, ...]  # dotted config paths in the key
    inputs: Callable[[Config], tuple[str, ...]]  # upstream stages
    outputs: Callable[[Config, Layout], list[str]]  # what downstream reads (fingerprinted)
    owns: Callable[[Config, Layout], list[str]]  # folders cleared when the key changes
    raw: Callable[[Config], list[str]] = field(default=lambda cfg: [])  # external inputs
    # in the key when not 0: a fix that changes what a stage writes for these settings
    version: Callable[[Config], int] = field(default=lambda cfg: 0)


TEACHER = ("teacher.model", "qg.prompt", "qg.max_passage_len", "qg.max_query_len")
BM25_KEY = ("bm25.k1", "bm25.b")  # what a BM25 ranking depends on (besides its inputs)
STAGES = [
    Stage("prepare", "raw data -> canonical parquet", _prepare, ("data",),
          lambda c: (), lambda c, lay: [lay.data_root], lambda c, lay: [lay.data_root],
          raw=lambda c: [u for u in (c.data.input, c.data.passages) if u]),
    Stage("bm25", "BM25 + answer match: training examples for data without positives", _bm25,
          ("bm25.positives", "bm25.train_query", "bm25.top_k", "bm25.n_negatives",
           "bm25.n_positives", "bm25.match", *BM25_KEY, "data.format", "data.shard_rows"),
          lambda c: ("prepare",), lambda c, lay: [lay.bm25_train],
          lambda c, lay: [lay.bm25_train]),
    Stage("bm25-eval", "the BM25 baseline's run of every eval split", _bm25_eval,
          ("bm25.baseline", *BM25_KEY, "eval.splits", "eval.data", "eval.top_k", "eval.pairs"),
          lambda c: ("prepare",), lambda c, lay: [lay.bm25_eval()],
          lambda c, lay: [lay.bm25_eval()], raw=_raw_eval_data),
    Stage("train-qg", "fine-tune the query generator (teacher)", _train_qg,
          ("qg", "run.seed", "data.shard_rows"), _positives,
          lambda c, lay: [lay.model("qg")], lambda c, lay: [lay.train_dir("qg")],
          raw=lambda c: _model_source(c.qg.model)),
    Stage("warmup", "contrastive warm-up of the dual encoder", _warmup,
          ("encoder", "warmup", "run.seed", "data.shard_rows"), _positives,
          lambda c, lay: [lay.model("warmup")], lambda c, lay: [lay.train_dir("warmup")],
          raw=lambda c: _model_source(c.encoder.model)),
    Stage("index", "encode the training corpus and build its index", _index,
          ("index.encode", "index.build", "run.seed"), lambda c: ("prepare", "warmup"),
          lambda c, lay: [lay.faiss("warmup", "train")],
          lambda c, lay: [lay.index_dir("warmup", "train")]),
    Stage("mine", "retrieve candidates and hard negatives for training queries", _mine,
          ("mine", "index.search"), lambda c: (*_positives(c), "warmup", "index"),
          lambda c, lay: [lay.candidates, lay.mined_train], lambda c, lay: [lay.mine_dir]),
    Stage("qg-rank", "ranking fine-tune of the teacher on mined hard negatives", _qg_rank,
          ("qg_rank", "run.seed", "data.shard_rows", *TEACHER),
          lambda c: ("prepare", *_qg_inputs(c), "mine"),
          lambda c, lay: [lay.model("qg-rank")] if c.qg_rank.enabled else [],
          lambda c, lay: [lay.train_dir("qg-rank")],
          raw=lambda c: _model_source(c.teacher.model)),
    Stage("generate", "teacher-generated queries in other languages", _generate,
          ("teacher.generate", "run.seed", *TEACHER),
          lambda c: (*_positives(c), *_qg_inputs(c)), lambda c, lay: [lay.generated],
          lambda c, lay: [lay.generated], raw=lambda c: _model_source(c.teacher.model)),
    Stage("score", "teacher scores log P(q|p)/|q| of the candidates distillation reads", _score,
          ("teacher.score", "distill.loss.kd_on_generated", "distill.loss.n_candidates",
           *TEACHER),
          lambda c: (*_positives(c), "mine", *_teacher_inputs(c),
                     *(("generate",) if c.distill.loss.kd_on_generated else ())),
          lambda c, lay: [lay.scores], lambda c, lay: [lay.scores, lay.generated_pairs],
          raw=lambda c: _model_source(c.teacher.model),
          # 1: generated queries' lists are scored whole (they were cut to n_candidates)
          version=lambda c: 1 if c.distill.loss.kd_on_generated else 0),
    Stage("distill", "contrastive + KD + alignment training of the dual encoder", _distill,
          ("encoder", "distill", "run.seed", "data.shard_rows"),
          lambda c: (*_positives(c), "warmup", "mine", "score",
                     *(("generate",) if c.distill.loss.beta else ())),
          lambda c, lay: [lay.model("distill")], lambda c, lay: [lay.train_dir("distill")]),
    Stage("reindex", "encode and index the evaluation corpus with both students", _reindex,
          ("index.encode", "index.build", "eval.splits", "run.seed"),
          lambda c: ("prepare", "warmup", "distill"),
          lambda c, lay: [lay.faiss(s, split) for s, split in reindexed(c, lay)],
          lambda c, lay: [lay.index_dir(s, split) for s, split in reindexed(c, lay)]),
    Stage("eval", "metrics of BM25, the untrained, warm-up and distilled students", _eval,
          ("eval", "index.search", "bm25.baseline"),
          lambda c: ("prepare", *(("bm25-eval",) if c.bm25.baseline else ()), "warmup",
                     "index", "distill", "reindex"),
          lambda c, lay: [lay.eval_dir(s) for s in _compared(c)],
          lambda c, lay: [lay.uri("eval")], raw=_raw_eval_data),
    Stage("rerank", "the teacher's reranking of the warm-up student's top-k (teacher quality)",
          _rerank, ("teacher.rerank_k", "eval.splits", "teacher.score", *TEACHER),
          lambda c: ("prepare", "eval", *_teacher_inputs(c)),
          lambda c, lay: [lay.rerank_dir(split) for split in c.eval.splits],
          lambda c, lay: [lay.uri("rerank")], raw=lambda c: _model_source(c.teacher.model)),
]
STAGE_NAMES = [s.name for s in STAGES]
BY_NAME = {s.name: s for s in STAGES}


def key_sections(stage: Stage, cfg: Config) -> tuple[str, ...]:
    """The config paths in ``stage``'s key: its sections, and ``run.seed`` where it reads a
    ``teacher.model`` built from ``init`` (random weights drawn with the run's seed)."""
    model = cfg.teacher.model
    random_teacher = model is not None and not model.name_or_path
    if random_teacher and "teacher.model" in stage.sections and "run.seed" not in stage.sections:
        return (*stage.sections, "run.seed")
    return stage.sections


# ----------------------------------------------------------------------------- the runner
def _section(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return key_values(value)


def _raw_fingerprint(uri: str) -> str:
    """A raw input's identity: its fingerprint when it is a file/folder, else the name (a hub
    id, a generated tokenizer)."""
    from qgscale.models.loading import PKG_PREFIX, resolve

    path = resolve(uri) if uri.startswith(PKG_PREFIX) else uri
    if ":" in path.split("/")[0] and "://" not in path:  # e.g. xquad-tokenizer:2000
        return uri
    try:
        return storage.fingerprint(path) or uri
    except (OSError, ValueError):
        return uri


def outputs_fingerprint(stage: Stage, cfg: Config, lay: Layout) -> str | None:
    """Fingerprint of everything downstream reads from ``stage``; None if any part is gone."""
    fps = [storage.fingerprint(u) for u in stage.outputs(cfg, lay)]
    return None if any(f is None for f in fps) else storage.config_hash(fps)


@dataclass
class Status:
    stage: str
    state: str  # done | stale | interrupted | missing
    reason: str = ""
    key: str | None = None
    parts: dict[str, Any] = field(default_factory=dict)
    selected: bool = True  # in the stages a run with --from / --only runs
    outputs: str | None = None  # a done stage's outputs fingerprint (what descendants key on)

    def line(self) -> str:
        return (f"{self.stage}: {self.state}" + (f" ({self.reason})" if self.reason else "")
                + ("" if self.selected else " [not selected]"))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short human account of which config keys, raw inputs or upstream outputs differ."""
    changes = []
    for dotted in sorted(set(old.get("config", {})) | set(new.get("config", {}))):
        a = _flatten(old.get("config", {}).get(dotted), dotted)
        b = _flatten(new.get("config", {}).get(dotted), dotted)
        changes += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
    for kind, label in (("raw", "file"), ("inputs", "input")):
        o, n = old.get(kind, {}), new.get(kind, {})
        changes += [f"{label} {k} changed" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    if old.get("version") != new.get("version"):
        changes.append(f"code version {old.get('version', 0)} -> {new.get('version', 0)}")
    if not changes:
        return "key changed"
    return "; ".join(changes[:3]) + (f"; +{len(changes) - 3} more" if len(changes) > 3 else "")


def read_record(lay: Layout, name: str) -> dict | None:
    uri = lay.record(name)
    return storage.read_json(uri) if storage.exists(uri) else None


def stage_status(stage: Stage, cfg: Config, lay: Layout, upstream: dict[str, Status]) -> Status:
    """Where ``stage`` stands, given its upstream stages' statuses (nothing is run)."""
    record = read_record(lay, stage.name)
    pending = [u for u in stage.inputs(cfg) if upstream[u].state != "done"]
    if pending:
        if record is None:
            return Status(stage.name, "missing")
        return Status(stage.name, "stale", f"input {pending[0]} will rerun")
    parts = {"config": {s: _section(cfg, s) for s in key_sections(stage, cfg)},
             "raw": {u: _raw_fingerprint(u) for u in stage.raw(cfg)},
             "inputs": {u: upstream[u].outputs or outputs_fingerprint(BY_NAME[u], cfg, lay)
                        for u in stage.inputs(cfg)}}  # each listed once per planning pass
    if stage.version(cfg):
        parts["version"] = stage.version(cfg)
    key = storage.config_hash(parts)
    if record is None:
        return Status(stage.name, "missing", key=key, parts=parts)
    if record.get("key") != key:
        return Status(stage.name, "stale", _what_changed(record.get("parts", {}), parts), key,
                      parts)
    if record.get("state") != "done":
        return Status(stage.name, "interrupted", "same key: resumes", key, parts)
    outputs = outputs_fingerprint(stage, cfg, lay)
    if outputs is None:
        return Status(stage.name, "missing", "output deleted", key, parts)
    return Status(stage.name, "done", key=key, parts=parts, outputs=outputs)


def plan(cfg: Config, start: str | None = None, only: str | None = None) -> list[Status]:
    """The status of every stage, in order (what ``--dry-run`` prints). With ``start`` or
    ``only`` (:func:`select`), the other stages are marked not selected, and a selected stage
    that is not done and waits on an unselected one that is not done says that a run stops
    there (:func:`run` raises ``MissingInputError``)."""
    lay = Layout(cfg)
    selected = {s.name for s in select(start, only)}
    statuses: dict[str, Status] = {}
    for stage in STAGES:
        status = stage_status(stage, cfg, lay, statuses)
        status.selected = stage.name in selected
        blocked = [u for u in stage.inputs(cfg)
                   if u not in selected and statuses[u].state != "done"]
        if status.selected and status.state != "done" and blocked:
            status.reason = (f"needs stage {blocked[0]} ({statuses[blocked[0]].state}), not "
                             "selected: the run stops here")
        statuses[stage.name] = status
    return list(statuses.values())


def select(start: str | None, only: str | None) -> list[Stage]:
    """The stages to run: all, from ``start`` on, or ``only`` one (not both)."""
    for name in (start, only):
        if name and name not in BY_NAME:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    if start and only:
        raise ConfigError(f"--from {start} and --only {only}: give one of them (--from runs "
                          "a stage and every later one, --only that stage alone)")
    if only:
        return [BY_NAME[only]]
    return STAGES[STAGE_NAMES.index(start):] if start else STAGES


def _write_record(lay: Layout, stage: Stage, status: Status, **extra: Any) -> None:
    record = {"stage": stage.name, "key": status.key, "parts": status.parts, **extra}
    storage.write_bytes(lay.record(stage.name),
                        json.dumps(record, indent=1, default=str).encode())


def shared_inputs(cfg: Config, stage: Stage) -> dict[str, str]:
    """The external inputs of ``stage`` that its tasks read on every node (what
    :func:`qgscale.runtime.check_shared` checks before it runs), by setting: its ``raw``
    inputs, except that ``prepare`` reads on tasks only the passage collection (its other
    input files are read by the driver)."""
    raw = stage.raw(cfg)
    if stage.name == "prepare":
        from qgscale.data.prepare import collection_of

        d = cfg.data
        coll = collection_of(d.format, d.input, passages=d.passages, corpus_langs=d.corpus_langs,
                             lang=d.lang)
        raw = [coll[0]] if coll else []
    names = {"data.input": cfg.data.input, "data.passages": cfg.data.passages,
             "eval.data": cfg.eval.data, "qg.model.name_or_path": cfg.qg.model.name_or_path,
             "encoder.model.name_or_path": cfg.encoder.model.name_or_path,
             "teacher.model.name_or_path": getattr(cfg.teacher.model, "name_or_path", None)}
    return {next((k for k, v in names.items() if v == u), f"{stage.name} input {i}"): u
            for i, u in enumerate(raw)}


TRAINING = {"train-qg": "qg", "warmup": "warmup", "qg-rank": "qg_rank", "distill": "distill"}


def preflight(cfg: Config, lay: Layout, selected: set[str]) -> None:
    """Before the first stage runs: a ResourceError when a selected training stage cannot
    get its Ray Train workers on this cluster at its largest (:func:`check_workers`), not
    after the hours of the stages before it. A stage recorded done is not checked here (it
    may still run again, when an upstream stage changes: its own check at its start then
    stands)."""
    from qgscale.train.trainer import check_workers

    for name, section in TRAINING.items():
        if name not in selected or (name == "qg-rank" and not cfg.qg_rank.enabled):
            continue
        if (read_record(lay, name) or {}).get("state") != "done":
            check_workers(getattr(cfg, section), section)


def run(cfg: Config, start: str | None = None, only: str | None = None) -> dict[str, Any]:
    """Run the stages that are not done (all, from ``start``, or ``only`` one), in order.

    Returns each selected stage's summary (a done stage's from its record). A stage whose
    upstream is not done and not selected is an error naming what to run first.
    """
    lay = Layout(cfg)
    selected = {s.name for s in select(start, only)}
    statuses: dict[str, Status] = {}
    results: dict[str, Any] = {}
    connected = False
    for stage in STAGES:
        status = stage_status(stage, cfg, lay, statuses)
        statuses[stage.name] = status
        if stage.name not in selected:
            continue
        if status.state == "done":
            log.info("stage %s: done, skipped", stage.name)
            results[stage.name] = (read_record(lay, stage.name) or {}).get("summary")
            continue
        if status.key is None:  # an upstream stage outside the selection is not done
            pending = [u for u in stage.inputs(cfg) if statuses[u].state != "done"]
            raise MissingInputError(
                f"stage {stage.name} needs stage {pending[0]} ({statuses[pending[0]].state}); "
                f"run `qgscale run CONFIG --only {pending[0]}` (or the whole pipeline) first")
        if not connected:
            from qgscale import runtime

            runtime.connect(cfg.ray)
            connected = True
            preflight(cfg, lay, selected)
        runtime.check_shared(shared_inputs(cfg, stage), {"run.root": cfg.run.root})
        if status.state in ("stale", "missing"):
            for uri in stage.owns(cfg, lay):  # a new key starts from scratch
                storage.remove(uri, recursive=True)
        log.info("stage %s: %s%s: %s", stage.name, status.state,
                 f" ({status.reason})" if status.reason else "", stage.help)
        t0 = time.time()
        _write_record(lay, stage, status, state="running", started=t0)
        summary = stage.run(cfg, lay, status.key)
        _write_record(lay, stage, status, state="done", started=t0, wall_s=time.time() - t0,
                      outputs=(outputs := outputs_fingerprint(stage, cfg, lay)),
                      summary=summary)
        statuses[stage.name] = Status(stage.name, "done", key=status.key, parts=status.parts,
                                      outputs=outputs)
        results[stage.name] = summary
        log.info("stage %s: done in %.1f s", stage.name, time.time() - t0)
        logs.sync()  # a remote run root's log, so far
    return results


def summary_table(results: dict[str, dict], metrics: tuple[str, ...] = (
        "mrr@10", "recall@1", "recall@10", "ndcg@10")) -> str:
    """Markdown table: macro metrics of each student on each split, side by side (plus
    R@2kt / R@5kt and DPR's acc@20 / acc@100 where answers were scored)."""
    macros = [r.get("query_langs_macro") or r.get("macro") or {}
              for by_split in results.values() for r in by_split.values()]
    metrics = tuple(metrics) + tuple(m for m in ("r@2kt", "r@5kt", "acc@20", "acc@100")
                                     if m not in metrics and any(m in x for x in macros))
    rows = ["| student | split | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics)]
    for stage, by_split in results.items():
        for split, r in by_split.items():
            macro = r.get("query_langs_macro") or r.get("macro") or {}
            cells = [f"{macro[m]:.4f}" if isinstance(macro.get(m), float) else "-"
                     for m in metrics]
            rows.append(f"| {stage} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
