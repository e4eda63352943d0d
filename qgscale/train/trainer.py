"""Ray Train driver (thin ``TorchTrainer`` wrapper) and the four training stages.

Stage outputs (``<run root>/train/<stage>/``)::

    data/part-*.parquet   training rows (joined texts, teacher scores, generated queries)
    init/                 the starting model (built from the config, or copied from ``init``;
                          complete once its _manifest.json is written, after the model)
    ray/run/checkpoint_*  Ray Train checkpoints (DeepSpeed ZeRO shards of every worker, and
                          the position in the sample stream: epoch, samples consumed)
    metrics.jsonl         per-step loss, samples/s, lr, ETA (rank 0)
    tensorboard/          the same metrics as TensorBoard event files
    model/                the trained model in HF format (the fp32 master weights)
    model-bf16/           a bf16 copy of it (``export_bf16: true`` only)
    _manifest.json

The pipeline's runner decides whether a stage runs (``qgscale.pipeline``): with a new key the
folder is cleared and a fresh Ray Train run starts; an interrupted run with the same key
resumes from its latest checkpoint and repeats the uninterrupted run's steps (same data
order, same losses), also when resumed on another worker count (universal checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import TrainConfig
from qgscale.data.corpus import read_rows
from qgscale.errors import ConfigError, DataError, MissingInputError
from qgscale.runtime import (
    ResourceError,
    Resources,
    check_fits,
    cluster_capacity,
    connect,
    worker_env,
)
from qgscale.teacher.scoring import query_table
from qgscale.train import data as tdata
from qgscale.train import tracking
from qgscale.train.loop import TrainRun, plan_steps, train_loop_per_worker
from qgscale.train.order import list_shards
from qgscale.train.tasks import QGRankTask, QGTask, StudentTask

log = logging.getLogger("qgscale.train")


def fit(run: TrainRun, rows_uri: str) -> Any:
    """Run :func:`train_loop_per_worker` for ``run`` on ``run.config.num_workers`` Ray Train
    workers over the training shards under ``rows_uri``.

    Ray Train asks the autoscaler for the worker group itself (through Ray's
    ``AutoscalingCoordinator``, as :func:`qgscale.runtime.requesting` does for the other
    stages); the stage checked the cluster can hold it (:func:`check_workers`) before it
    built its rows.

    Every worker reads its micro-batches of the deterministic sample stream from the shards
    itself (:mod:`qgscale.train.order`; no Ray Data split, whose row-to-worker assignment
    and order are not reproducible). Checkpoints go to ``<run.output_uri>/ray`` (local or
    ``s3://``; rerunning resumes from the latest one, also on another worker count);
    ``FailureConfig(max_failures=...)`` restarts the worker group from it after a worker
    dies. Returns the ``ray.train.Result``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = run.config
    if tc.mlflow_uri:
        tracking.mlflow_module()  # a clear error here, before any worker starts
    shards = list_shards(rows_uri)
    if not shards:
        raise DataError(f"{rows_uri}: no training shards")
    if sum(s.rows for s in shards) != run.rows:
        raise DataError(f"{rows_uri}: the shards hold {sum(s.rows for s in shards)} rows, "
                        f"expected {run.rows}")
    run = dataclasses.replace(run, shards=shards)
    ckpt_root = storage.join(run.output_uri, "ray")
    storage.makedirs(ckpt_root)
    if storage.is_local(ckpt_root):
        ckpt_root = os.path.abspath(storage.url_to_fs(ckpt_root)[1])
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"run": run},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker,
                                  **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="run", storage_path=storage.ray_path(ckpt_root),
            storage_filesystem=storage.pyarrow_filesystem(ckpt_root),
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    with _progress(run):
        try:
            return trainer.fit()
        except BaseException:
            if tc.mlflow_uri:  # the workers leave it RUNNING: see train_loop_per_worker
                with contextlib.suppress(Exception):
                    tracking.mark_failed(tc.mlflow_uri, tc.mlflow_experiment, run.output_uri)
            raise


def check_workers(tc: TrainConfig, stage: str) -> None:
    """Check the Ray Train workers of ``tc`` (section ``stage``) against what the cluster
    can have: a :class:`qgscale.runtime.ResourceError` when it cannot (a Ray Train run
    would otherwise wait for them forever)."""
    n = tc.num_workers
    if n < 1:
        raise ResourceError(f"{stage}.num_workers={n}: expected >= 1")
    for what, need, knob in (("CPU", tc.cpus_per_worker * n, "cpus_per_worker"),
                             ("GPU", float(n) if tc.use_gpu else 0.0, "use_gpu")):
        now, most = cluster_capacity(what)
        if need and most is not None and need > most:
            raise ResourceError(
                f"{stage}: num_workers={n} x {knob}={getattr(tc, knob)} asks for {need:g} "
                f"{what}s but the Ray cluster has {now:g} (at most {most:g}); join a cluster "
                f"with them (ray.address) or lower {stage}.num_workers"
                + (f" or set {stage}.use_gpu: false" if what == "GPU" else ""))
    check_fits(Resources(stage, n, tc.cpus_per_worker, 1.0 if tc.use_gpu else 0.0),
               f"num_workers={n} Ray Train workers",
               f"lower {stage}.num_workers or cpus_per_worker, or add nodes that can run them")


@contextlib.contextmanager
def _progress(run: TrainRun, every_s: float = 2.0) -> Iterator[None]:
    """One progress line on the driver (step/total, loss, samples/s, ETA) while the workers
    train, read from rank 0's ``metrics.jsonl`` (worker logs stay out of the console)."""
    import json
    import threading

    from tqdm import tqdm

    total = plan_steps(run.rows, run.config.num_workers, run.config).total
    name = {"QGTask": "qg", "QGRankTask": "qg-rank"}.get(type(run.task).__name__, "student")
    bar = tqdm(total=total, unit="step", desc=f"train {name}", leave=True)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                # its last line only (the log grows with the steps; read every 2 s)
                lines = storage.read_tail(run.metrics_uri).decode(errors="replace").splitlines()
                last = json.loads(lines[-1]) if lines else None
            except (OSError, ValueError):
                continue
            if last and last.get("step", 0) >= bar.n:
                bar.update(last["step"] - bar.n)
                bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}",
                                samples_per_s=f"{last.get('samples_per_s', 0):.1f}")

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _finish(out: str, key: str, result: Any, **extra: Any) -> dict[str, Any]:
    ckpt = None
    if result.checkpoint is not None:
        ckpt = result.checkpoint.path
        if not storage.is_local(out):  # pyarrow paths carry no scheme
            ckpt = f"{out.split('://', 1)[0]}://{ckpt}"
    return storage.write_manifest(out, key, model=storage.join(out, "model"), checkpoint=ckpt,
                                  final_metrics=dict(result.metrics or {}), **extra)


def _student_stage(cfg: Any, stage: str, *, out_uri: str, key: str, init_uri: str | None,
                   queries_uri: str, corpus_uri: str, qrels_uri: str | None,
                   examples_uri: str | None, candidates_uri: str | None,
                   scores_uri: str | None, generated_uri: str | None) -> dict[str, Any]:
    from qgscale.models.encoder import DualEncoder

    sc = getattr(cfg, stage)
    connect(cfg.ray)
    check_workers(sc, stage)  # fail fast, before the rows are built
    distill = stage == "distill"
    if distill:
        lc = sc.loss
        if lc.align in ("student_kl", "teacher_kl") and lc.beta and not lc.n_candidates:
            raise ConfigError(f"distill.loss.align={lc.align} needs distill.loss.n_candidates "
                              "> 0")
    inputs = dict(queries_uri=queries_uri, corpus_uri=corpus_uri, qrels_uri=qrels_uri,
                  examples_uri=examples_uri, candidates_uri=candidates_uri,
                  scores_uri=scores_uri, generated_uri=generated_uri, init_uri=init_uri)
    if init_uri and not init_uri.startswith("pkg:") and not storage.exists(init_uri):
        raise MissingInputError(f"{init_uri}: initial model not found (for distill: run "
                                "`qgscale train warmup` first)")
    rows_uri = storage.join(out_uri, "data")
    sources = dict(qrels_uri=qrels_uri, examples_uri=examples_uri,
                   candidates_uri=candidates_uri, scores_uri=scores_uri,
                   generated_uri=generated_uri, seed=cfg.run.seed)
    counts = _built_rows(rows_uri, key, ("rows", "random_negatives", "without_generated"))
    if counts is None and _training_queries(examples_uri, qrels_uri) >= cfg.data.ray_rows_from:
        from qgscale.train.rows_dataset import build_student_rows_dataset

        counts = build_student_rows_dataset(
            queries_uri, corpus_uri, rows_uri, key, sc.loss, shard_rows=cfg.data.shard_rows,
            num_partitions=cfg.data.ray_rows_partitions, **sources)
    elif counts is None:
        table, counts = tdata.build_student_rows(queries_uri, corpus_uri, sc.loss, **sources)
        tdata.write_rows(table, rows_uri, cfg.data.shard_rows, key, **counts)
    log.info("%s: %s", stage, counts)

    def build() -> DualEncoder:
        if init_uri:
            return DualEncoder.from_pretrained(init_uri)
        import torch

        torch.manual_seed(cfg.run.seed)
        return DualEncoder.build(cfg.encoder, max_query_len=sc.max_query_len,
                                 max_passage_len=sc.max_passage_len)

    init = init_model(out_uri, key, build)
    run = TrainRun(StudentTask(sc, distill=distill), init_uri=init, output_uri=out_uri,
                   rows=counts["rows"], seed=cfg.run.seed, storage_env=worker_env())
    result = fit(run, rows_uri)
    return _finish(out_uri, key, result, stage=stage, counts=counts, inputs=inputs)


def init_model(out_uri: str, key: str, build: Callable[[], Any]) -> str:
    """``out_uri/init``, the stage's starting model: ``build()`` saved there, unless a
    complete one is there already (its manifest, with ``key``, is written after every file
    of the model). A half-written one (a crash mid-save: HF writes ``config.json`` before the
    weights, an upload goes file by file) is removed and written again."""
    init = storage.join(out_uri, "init")
    if not storage.stage_done(init, key):
        storage.remove(init, recursive=True)
        build().save_pretrained(init)
        storage.write_manifest(init, key, what="initial model")
    return init


def _built_rows(rows_uri: str, key: str, fields: tuple[str, ...]) -> dict[str, Any] | None:
    """The counts ``fields`` of the rows under ``rows_uri`` if they were built with ``key``
    (a re-run reuses them), else None."""
    manifest = storage.read_manifest(rows_uri)
    if manifest and manifest.get("config_hash") == key:
        return {k: manifest[k] for k in fields}
    return None


def _training_queries(examples_uri: str | None, qrels_uri: str | None) -> int:
    """An upper bound of the training queries from the parquet footers of their positives
    (examples, else qrels): picks the driver or the Ray Data row join."""
    from qgscale.train.order import list_shards

    uri = examples_uri if examples_uri and storage.exists(examples_uri) else qrels_uri
    return sum(s.rows for s in list_shards(uri)) if uri and storage.exists(uri) else 0


def run_train_warmup(cfg: Any, *, out_uri: str, key: str, queries_uri: str, corpus_uri: str,
                     qrels_uri: str | None, examples_uri: str | None = None,
                     init_uri: str | None = None) -> dict[str, Any]:
    """``qgscale train warmup``: contrastive training of the dual encoder (``cfg.warmup``).

    Positives from ``examples_uri`` (``{qid, pos_pids, neg_pids}``) or qrels; hard negatives
    from the examples or random corpus passages. Model: ``cfg.encoder`` (or ``init_uri``).
    Writes ``out_uri/model``; ``key`` marks the run (same key: resume from its checkpoint).
    """
    return _student_stage(cfg, "warmup", out_uri=out_uri, key=key, init_uri=init_uri,
                          queries_uri=queries_uri, corpus_uri=corpus_uri, qrels_uri=qrels_uri,
                          examples_uri=examples_uri, candidates_uri=None, scores_uri=None,
                          generated_uri=None)


def run_train_distill(cfg: Any, *, out_uri: str, key: str, init_uri: str, candidates_uri: str,
                      scores_uri: str, generated_uri: str | None, queries_uri: str,
                      corpus_uri: str, qrels_uri: str | None, examples_uri: str | None
                      ) -> dict[str, Any]:
    """``qgscale train distill``: contrastive + alpha * KD + beta * alignment (``cfg.distill``)
    from ``init_uri`` (the warm-up model) on the mined ``candidates_uri`` with teacher
    ``scores_uri``, positives and hard negatives from ``examples_uri`` (else qrels +
    candidates), generated queries from ``generated_uri`` (None when ``beta == 0``)."""
    return _student_stage(cfg, "distill", out_uri=out_uri, key=key, init_uri=init_uri,
                          queries_uri=queries_uri, corpus_uri=corpus_uri, qrels_uri=qrels_uri,
                          examples_uri=examples_uri, candidates_uri=candidates_uri,
                          scores_uri=scores_uri, generated_uri=generated_uri)


def run_train_qg(cfg: Any, *, out_uri: str, key: str, queries_uri: str, corpus_uri: str,
                 qrels_uri: str) -> dict[str, Any]:
    """``qgscale train qg``: seq2seq fine-tuning of the query generator (``cfg.qg``) on
    (prompt(lang, passage) -> query) pairs of the training qrels; writes ``out_uri/model``."""
    from qgscale.models.generator import QueryGenerator, qg_examples

    qc = cfg.qg
    connect(cfg.ray)
    check_workers(qc, "qg")  # fail fast, before the rows are built
    inputs = dict(queries_uri=queries_uri, corpus_uri=corpus_uri, qrels_uri=qrels_uri)
    for uri, what in ((queries_uri, "queries"), (corpus_uri, "corpus"), (qrels_uri, "qrels")):
        if not storage.exists(uri):
            raise MissingInputError(f"{uri}: {what} not found")
    rows_uri = storage.join(out_uri, "data")
    built = _built_rows(rows_uri, key, ("rows",))
    if built is None and _training_queries(None, qrels_uri) >= cfg.data.ray_rows_from:
        from qgscale.train.rows_dataset import build_qg_rows_dataset

        built = build_qg_rows_dataset(
            queries_uri, corpus_uri, qrels_uri, rows_uri, key, shard_rows=cfg.data.shard_rows,
            num_partitions=cfg.data.ray_rows_partitions)
    elif built is None:
        # rows in the order of the Ray Data build (a hash of qid and pid: languages mixed)
        qrels = tdata.in_row_order(  # empty ids of positive rows: DataErrors, file and row
            tdata.read_checked(qrels_uri, "qrels", tdata.check_positive_qrels), ("qid", "pid"))
        positives = pc.filter(qrels.column("pid"), pc.greater(qrels.column("rel"), 0))
        queries = query_table(queries_uri)  # empty fields, a qid twice: DataErrors
        rows = list(qg_examples(queries.rename_columns(["qid", "lang", "text"]),  # semi-join
                                read_rows(corpus_uri, positives.to_pylist()), qrels,
                                qrels_uri, queries_uri, corpus_uri))
        table = pa.Table.from_pylist(rows, schema=tdata.QG_ROWS)
        tdata.write_rows(table, rows_uri, cfg.data.shard_rows, key)
        built = {"rows": table.num_rows}
    n_rows = built["rows"]
    init = init_model(out_uri, key, lambda: QueryGenerator.build(
        qc.model, qc.prompt, qc.max_passage_len, qc.max_query_len, seed=cfg.run.seed))
    run = TrainRun(QGTask(qc), init_uri=init, output_uri=out_uri, rows=n_rows,
                   seed=cfg.run.seed, storage_env=worker_env())
    result = fit(run, rows_uri)
    return _finish(out_uri, key, result, stage="qg", counts={"rows": n_rows},
                   inputs=inputs)


def run_train_qg_rank(cfg: Any, *, out_uri: str, key: str, qg_model: Any, examples_uri: str,
                      queries_uri: str, corpus_uri: str) -> dict[str, Any]:
    """``qgscale train qg-rank``: the teacher's ranking fine-tune (``cfg.qg_rank``).

    Starts from ``qg_model`` (a ``ModelConfig``: the fine-tuned QG or ``teacher.model``) and
    trains :class:`QGRankTask` on each training query's positive and its first
    ``n_negatives`` mined hard negatives (``examples_uri``: ``mine/train``); writes
    ``out_uri/model``, the teacher that ``score`` and ``rerank`` use.
    """
    from qgscale.models.generator import QueryGenerator

    rc = cfg.qg_rank
    connect(cfg.ray)
    check_workers(rc, "qg_rank")  # fail fast, before the rows are built
    if not storage.exists(examples_uri):
        raise MissingInputError(f"{examples_uri}: mined training examples not found (run "
                                "`qgscale index mine` first)")
    inputs = dict(queries_uri=queries_uri, corpus_uri=corpus_uri, examples_uri=examples_uri,
                  qg_model=qg_model.model_dump())
    rows_uri = storage.join(out_uri, "data")
    counts = _built_rows(rows_uri, key, ("rows", "short_lists", "no_negatives"))
    if counts is None and _training_queries(examples_uri, None) >= cfg.data.ray_rows_from:
        from qgscale.train.rows_dataset import build_qg_rank_rows_dataset

        counts = build_qg_rank_rows_dataset(
            queries_uri, corpus_uri, examples_uri, rc.n_negatives, rows_uri, key,
            seed=cfg.run.seed, shard_rows=cfg.data.shard_rows,
            num_partitions=cfg.data.ray_rows_partitions)
    elif counts is None:
        table, counts = tdata.build_qg_rank_rows(queries_uri, corpus_uri, examples_uri,
                                                 rc.n_negatives, seed=cfg.run.seed)
        tdata.write_rows(table, rows_uri, cfg.data.shard_rows, key, **counts)
    log.info("qg-rank: %s", counts)
    qc = cfg.qg
    init = init_model(out_uri, key, lambda: QueryGenerator.build(
        qg_model, qc.prompt, qc.max_passage_len, qc.max_query_len, seed=cfg.run.seed))
    run = TrainRun(QGRankTask(rc), init_uri=init, output_uri=out_uri, rows=counts["rows"],
                   seed=cfg.run.seed, storage_env=worker_env())
    result = fit(run, rows_uri)
    return _finish(out_uri, key, result, stage="qg-rank", counts=counts, inputs=inputs)
