"""``train_loop_per_worker``: DeepSpeed inside a Ray Train worker.

One :class:`TrainRun` (task, init folder, output, training shards) reaches every worker,
which reads ``ray.train.get_checkpoint()`` (and the position in the sample stream it
recorded) -> sets up the DeepSpeed engine (config from :func:`deepspeed_config`) and loads
the checkpoint: as saved when the worker count is unchanged, else as a DeepSpeed universal
checkpoint (or, with ``elastic_resume: weights``, the consolidated fp32 weights with a fresh
optimizer state) -> trains over its micro-batches of the deterministic sample stream
(:mod:`qgscale.train.order`: the data order is a function of the seed, the epoch and the
global sample index; tokenisation runs ahead of the step in a prefetching thread) -> every
``log_every`` optimizer steps reports metrics, every ``checkpoint_every`` also an
``engine.save_checkpoint`` folder plus the stream position as a ``ray.train.Checkpoint``
(every worker writes its own ZeRO shard; Ray merges the folders) -> exports the fp32 master
weights in HF format (optionally also a bf16 copy). Rank 0 logs loss, samples/s and ETA, and
writes ``metrics.jsonl``, TensorBoard event files and (optionally) MLflow metrics
(:mod:`qgscale.train.tracking`).

Random ops in the step (dropout) are seeded per micro-batch from (seed, epoch, sample
index), so a resumed run repeats the uninterrupted run's steps exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qgscale import storage
from qgscale.config import TrainConfig
from qgscale.train.order import Loader, Shard, sample_seed
from qgscale.train.tasks import Task
from qgscale.train.tracking import Tracker

log = logging.getLogger("qgscale.train")
CKPT_TAG = "ckpt"
STATE_FILE = "qgscale_state.json"


@dataclass(frozen=True)
class TrainRun:
    """Everything a worker needs: what to train (``task``, with its config section), the
    init model folder URI, the output folder URI, the number of training rows and the
    parquet shards holding them, the seed and the storage (S3) environment variables."""

    task: Task
    init_uri: str
    output_uri: str
    rows: int
    seed: int = 13
    storage_env: dict[str, str] = field(default_factory=dict, repr=False)
    shards: tuple[Shard, ...] = ()

    @property
    def config(self) -> TrainConfig:
        return self.task.config

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.output_uri, "metrics.jsonl")


def deepspeed_config(tc: TrainConfig, world_size: int, load_universal: bool = False
                     ) -> dict[str, Any]:
    """DeepSpeed config from a ``TrainConfig`` (ZeRO with its communication settings,
    precision, accumulation, clipping, AdamW; the schedule is :func:`lr_scheduler`'s);
    ``load_universal``: the checkpoint to load is a universal one."""
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.zero_stage:
        zero.update(overlap_comm=tc.overlap_comm, contiguous_gradients=tc.contiguous_gradients,
                    reduce_bucket_size=tc.reduce_bucket_size)
        if tc.zero_stage == 3:  # ZeRO-3 all-gathers parameters ahead of use in these buckets
            zero.update(stage3_prefetch_bucket_size=tc.allgather_bucket_size,
                        stage3_gather_16bit_weights_on_model_save=True)
        else:
            zero.update(allgather_bucket_size=tc.allgather_bucket_size)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.clip_grad,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            "torch_adam": True}},  # no CUDA extension build needed, works on CPU and GPU
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if tc.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    return cfg


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``lr``: linear
    warm-up over the first ``warmup`` steps from 1/warmup (no step at 0), then linear decay
    to 1/(total - warmup) at the last step. (DeepSpeed's WarmupDecayLR gave the first two
    steps lr 0 and peaked two steps late.)"""
    return max(0.0, min((step + 1) / warmup, (total - step) / max(1, total - warmup), 1.0))


def schedule_at(engine: Any, step: int) -> None:
    """Set ``engine``'s :func:`lr_scheduler` to optimizer step ``step`` (0-based: the next
    step it takes). A resume sets the schedule from its step, not from the checkpoint's
    scheduler state, which checkpoints of older releases hold for another scheduler."""
    import warnings

    if engine.lr_scheduler is not None:
        engine.lr_scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()":
            warnings.simplefilter("ignore", UserWarning)  # here it sets, it skips nothing
            engine.lr_scheduler.step()


def lr_scheduler(tc: TrainConfig, total_steps: int) -> Callable[[Any], Any]:
    """The scheduler ``deepspeed.initialize`` builds on its optimizer (:func:`lr_factor`;
    warm-up: ``warmup_ratio`` of ``total_steps``, at least one step)."""
    import functools

    warmup = max(1, int(tc.warmup_ratio * total_steps))
    factor = functools.partial(lr_factor, warmup=warmup, total=max(total_steps, 1))
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Position:
    """Where a run is: optimizer steps done, the epoch, and the samples of that epoch
    consumed (a multiple of the samples per step of the worker count that consumed them)."""

    step: int = 0
    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Plan:
    """Optimizer steps per epoch and in all, for ``world`` workers."""

    per_epoch: int
    total: int
    world: int
    samples_per_step: int


def plan_steps(rows: int, world_size: int, tc: TrainConfig, at: Position | None = None
               ) -> Plan:
    """Each optimizer step takes ``world x batch_size x grad_accum`` samples of the epoch's
    stream (an incomplete last step is dropped); ``max_steps`` caps the total. ``at``: a
    resumed run's position (possibly reached with another worker count)."""
    sps = tc.batch_size * tc.grad_accum * world_size
    per_epoch = rows // sps
    if per_epoch == 0:
        raise ValueError(f"{rows} training rows are too few for {world_size} workers x batch "
                         f"{tc.batch_size} x grad_accum {tc.grad_accum}")
    total = per_epoch * tc.epochs
    if at is not None and at.step:
        total = at.step + max(0, tc.epochs - at.epoch - 1) * per_epoch
        if at.epoch < tc.epochs:
            total += (rows - at.offset) // sps
    if tc.max_steps:
        total = min(total, tc.max_steps)
    return Plan(per_epoch, total, world_size, sps)


@dataclass
class Progress:
    """Where this worker is: optimizer steps done, the epoch and the samples of it consumed
    (by all workers), the step this attempt started from (0 or the checkpoint it resumed),
    logged metrics (rank 0 writes them) and the per-micro-batch metrics since the last
    logged step."""

    step: int = 0
    epoch: int = 0
    offset: int = 0
    start_step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    window: list[dict[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)
    mlflow_run_id: str | None = None
    resume: str | None = None  # how this attempt resumed: see resume_mode


# --- the steps of a worker -------------------------------------------------------------------
@dataclass
class Restored:
    """A checkpoint to resume from: its local folder and the state rank 0 recorded."""

    dir: str
    state: dict[str, Any]
    source: str = ""  # where the checkpoint is kept (Ray's path): the same for every worker

    @property
    def position(self) -> Position:
        s = self.state
        return Position(s["step"], s.get("epoch", 0), s.get("offset", 0))


def open_checkpoint(checkpoint: Any, stack: contextlib.ExitStack) -> Restored | None:
    """The ``ray.train.Checkpoint`` as a local folder (kept open by ``stack``), or None."""
    if checkpoint is None:
        return None
    d = stack.enter_context(checkpoint.as_directory())
    with open(os.path.join(d, STATE_FILE)) as f:
        return Restored(d, json.load(f), str(getattr(checkpoint, "path", d)))


def resume_mode(restored: Restored | None, world: int, tc: TrainConfig) -> str | None:
    """None (fresh start), "same" (load the checkpoint as saved), "universal" or "weights"
    (the worker count changed and the checkpoint holds per-worker partitions)."""
    if restored is None:
        return None
    saved = restored.state.get("world", world)
    partitioned = tc.zero_stage > 0  # (16-bit precision needs ZeRO: TrainConfig)
    if saved == world or not partitioned:
        return "same"
    return tc.elastic_resume


def to_universal(ckpt_dir: str, out_root: str) -> str:
    """Convert the DeepSpeed checkpoint ``<ckpt_dir>/<CKPT_TAG>`` into a universal checkpoint
    under ``out_root`` (same tag; one process, no pool) and return ``out_root``."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=os.path.join(ckpt_dir, CKPT_TAG),
        output_folder=os.path.join(out_root, CKPT_TAG), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    return out_root


FAILED_FOR_S = 600.0  # a failed conversion's marker holds for this attempt's workers only


def universal_copy(restored: Restored, stack: contextlib.ExitStack) -> str:
    """The universal conversion of ``restored``, made once per node: the workers of a node
    take a file lock in turn, the first converts into the system temp folder (fp32 weights
    and both AdamW moments: several GB for a base model, which every worker wrote before),
    the others find it complete; a failed conversion leaves a marker, so the others of this
    attempt fail at once instead of converting again (it is ignored after
    :data:`FAILED_FOR_S`). Every worker removes the copy when ``stack`` closes,
    which :func:`train_loop_per_worker` does only after a barrier: every worker of the run
    has loaded it by then (also a copy left by a crashed attempt)."""
    import fcntl
    import hashlib
    import shutil

    key = hashlib.sha256(f"{restored.source or restored.dir}\n{restored.state.get('step')}"
                         .encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), f"qgscale-universal-{key}")
    stack.callback(shutil.rmtree, root, True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if os.path.exists(root + ".failed") and \
                time.time() - os.path.getmtime(root + ".failed") < FAILED_FOR_S:
            with open(root + ".failed") as f:
                raise RuntimeError(f"another worker of this node failed to convert it: "
                                   f"{f.read()}")
        if not os.path.exists(os.path.join(root, ".complete")):
            tmp = f"{root}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                to_universal(restored.dir, tmp)
                open(os.path.join(tmp, ".complete"), "w").close()
                shutil.rmtree(root, ignore_errors=True)  # an unfinished copy of a crashed one
                os.rename(tmp, root)
            except Exception as e:
                with open(root + ".failed", "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
                stack.callback(os.remove, root + ".failed")
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return root


def agreed_mode(mode: str | None) -> str | None:
    """The resume mode every worker takes: "weights" when any worker's universal conversion
    failed (workers that loaded different kinds of checkpoint would run mismatched
    collectives: a hang), else ``mode``."""
    import torch.distributed as dist

    if mode not in ("universal", "weights") or not dist.is_initialized():
        return mode
    modes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(modes, mode)
    return "weights" if "weights" in modes else mode


def fp32_weights(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The consolidated fp32 weights of a DeepSpeed checkpoint (``zero_to_fp32``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=CKPT_TAG)


def setup_engine(run: TrainRun, plan: Plan, load_universal: bool = False,
                 weights: dict[str, torch.Tensor] | None = None
                 ) -> tuple[Any, Callable[[dict[str, Any]], Any]]:
    """The task's model (with ``weights`` loaded, if given) under ``deepspeed.initialize``,
    and its collator."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    model = run.task.build_model(run.init_uri)
    if weights is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        names = {n for n, _ in model.named_parameters()}
        if unexpected or names & set(missing):
            raise RuntimeError(f"checkpoint weights do not fit the model: missing "
                               f"{sorted(names & set(missing))[:5]}, unexpected {unexpected[:5]}")
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's shared-memory all-reduce serves CPU inference only (training reduces
        # through torch.distributed); marked unbuildable, it is not JIT-compiled (about a
        # minute of C++ on the first engine of every new environment: CI, a first demo)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=params,
        config=deepspeed_config(run.config, plan.world, load_universal),
        lr_scheduler=lr_scheduler(run.config, plan.total))
    return engine, run.task.collator(model)


def load_checkpoint(engine: Any, load_dir: str, step: int, universal: bool = False) -> None:
    """``engine.load_checkpoint`` of tag :data:`CKPT_TAG`, failing with the folder and step
    where DeepSpeed says less or nothing: a missing tag folder (DeepSpeed: a bare assertion),
    a ZeRO checkpoint without its optimizer states (a bare FileNotFoundError with ZeRO-1
    here; where its ZeRO load reports failure instead, it falls back to the 16-bit weights and
    AdamW's moments are lost), no module state loaded (it returns no path: the run would go
    on from step ``step`` with the initial weights). ``universal``: a universal checkpoint,
    whose optimizer states live in its ``zero/`` folder."""
    folder = os.path.join(load_dir, CKPT_TAG)
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise RuntimeError(f"{load_dir}: no checkpoint {CKPT_TAG!r} to resume step {step} from")
    if engine.zero_optimization() and not universal and not any(
            n.endswith("optim_states.pt") for n in os.listdir(folder)):
        raise RuntimeError(f"{folder}: a ZeRO checkpoint without its optimizer states "
                           f"(*optim_states.pt): resuming step {step} would lose them")
    load_path, _ = engine.load_checkpoint(load_dir, tag=CKPT_TAG,
                                          load_lr_scheduler_states=False)  # schedule_at
    if load_path is None:
        raise RuntimeError(f"{load_dir}: DeepSpeed loaded no checkpoint {CKPT_TAG!r} to resume "
                           f"step {step} from (its module states are missing or unreadable)")


def restore(run: TrainRun, world: int, restored: Restored | None, stack: contextlib.ExitStack
            ) -> tuple[Any, Callable[[dict[str, Any]], Any], Plan, Position, str | None]:
    """Engine, collator, plan, start position and resume mode (:func:`resume_mode`; after
    a failed universal conversion "weights") of this attempt: fresh, or resumed from
    ``restored`` (on the same worker count as saved, or another)."""
    tc = run.config
    at = restored.position if restored else Position()
    if restored and "offset" not in restored.state:  # written before the position was kept
        fresh = plan_steps(run.rows, world, tc)
        at = Position(at.step, at.step // fresh.per_epoch,
                      (at.step % fresh.per_epoch) * fresh.samples_per_step)
    plan = plan_steps(run.rows, world, tc, at)
    mode = resume_mode(restored, world, tc)
    weights = None
    load_dir = restored.dir if restored else None
    if mode == "universal":
        try:
            load_dir = universal_copy(restored, stack)
        except Exception as e:  # noqa: BLE001 -- any conversion failure: fall back below
            log.warning("converting the checkpoint of step %d to a DeepSpeed universal "
                        "checkpoint failed (%s: %s); falling back to its fp32 weights",
                        at.step, type(e).__name__, e)
            mode = "weights"
    if agreed_mode(mode) != mode:
        log.warning("another worker could not convert the checkpoint of step %d to a "
                    "universal checkpoint: every worker falls back to its fp32 weights",
                    at.step)
        mode = "weights"
    if mode == "weights":
        weights = fp32_weights(restored.dir)
        log.warning(
            "elastic resume from step %d: the checkpoint was written by %s workers, this run "
            "has %d; reloaded the consolidated fp32 weights only. LOST: the optimizer state "
            "(AdamW moments and step counts start fresh) and the DeepSpeed loss-scaler state; "
            "the learning-rate schedule continues at step %d", at.step,
            restored.state.get("world"), world, at.step)
    engine, collate = setup_engine(run, plan, load_universal=mode == "universal",
                                   weights=weights)
    if mode in ("same", "universal"):
        load_checkpoint(engine, load_dir, at.step, universal=mode == "universal")
        if mode == "universal":
            log.info("rank %d: resumed from the universal checkpoint of step %d (%s -> %d "
                     "workers)", engine.global_rank, at.step, restored.state.get("world"),
                     world)
    elif mode == "weights":
        engine.global_steps = at.step
        engine.global_samples = at.step * plan.samples_per_step
    if restored:  # fp16: DeepSpeed does not move the schedule on an overflow-skipped step
        schedule_at(engine, at.step - getattr(engine, "skipped_steps", 0))
        log.info("rank %d resumed from step %d (epoch %d, sample %d)", engine.global_rank,
                 at.step, at.epoch, at.offset)
    return engine, collate, plan, at, mode


def reload_metrics(run: TrainRun, step: int) -> list[dict[str, Any]]:
    """Metrics logged up to ``step`` by the attempts before this one."""
    if not step or not storage.exists(run.metrics_uri):
        return []
    return [m for m in (json.loads(x) for x in
                        storage.read_bytes(run.metrics_uri).splitlines() if x.strip())
            if m["step"] <= step]


def train(engine: Any, run: TrainRun, loader: Loader, plan: Plan, prog: Progress,
          tracker: Tracker | None) -> None:
    """Optimizer steps until ``plan.total``: this worker's micro-batches of the sample
    stream from ``prog``'s position, epoch after epoch."""
    tc = run.config
    sps = plan.samples_per_step
    while prog.step < plan.total:
        steps = min((loader.rows - prog.offset) // sps, plan.total - prog.step)
        if steps <= 0:  # the epoch's rest is too short for a step: next epoch
            prog.epoch, prog.offset = prog.epoch + 1, 0
            continue
        batches = loader.epoch(prog.epoch, prog.offset, steps * tc.grad_accum)
        try:
            for mb in batches:
                torch.manual_seed(sample_seed(run.seed, mb.epoch, mb.sample))
                loss, parts = run.task.step(engine, mb.batch.to(engine.device), plan.world)
                boundary = engine.is_gradient_accumulation_boundary()
                parts["lr"] = engine.get_lr()[0]  # the step's (read before it moves on)
                engine.backward(loss)
                engine.step()
                prog.window.append(parts)
                if not boundary:
                    continue
                prog.step += 1
                prog.offset += sps
                last = prog.step >= plan.total
                if last or prog.step % tc.checkpoint_every == 0:
                    report(engine, run, plan, prog, tracker, checkpoint=True)
                elif prog.step % tc.log_every == 0:
                    report(engine, run, plan, prog, tracker, checkpoint=False)
        finally:
            batches.close()


def _metrics(engine: Any, plan: Plan, prog: Progress) -> dict[str, Any]:
    """Mean of the window's per-micro-batch metrics, and progress, rate, lr and ETA."""
    elapsed = time.time() - prog.t0
    rate = (prog.step - prog.start_step) * plan.samples_per_step / max(elapsed, 1e-9)
    window, prog.window = prog.window, []
    m: dict[str, Any] = {k: sum(w.get(k, 0.0) for w in window) / len(window)
                         for k in window[0]}
    m.update(step=prog.step, epoch=prog.epoch, samples_per_s=rate, lr=window[-1]["lr"],
             eta_s=(plan.total - prog.step) * plan.samples_per_step
             / max(rate, 1e-9), elapsed_s=elapsed, start_step=prog.start_step,
             world=plan.world, resume=prog.resume, time=time.time())
    return m


def report(engine: Any, run: TrainRun, plan: Plan, prog: Progress, tracker: Tracker | None,
           checkpoint: bool) -> None:
    """``ray.train.report`` the metrics since the last report; with ``checkpoint`` also the
    DeepSpeed checkpoint of every worker with the stream position, and (rank 0) the metric
    files (``metrics.jsonl``, TensorBoard events) and, once the checkpoint is uploaded, the
    steps MLflow lacks."""
    import ray.train

    m = _metrics(engine, plan, prog)
    prog.log.append(m)
    rank = engine.global_rank
    if rank == 0:
        log.info("step %d/%d loss %.4f %.1f samples/s eta %.0fs", prog.step, plan.total,
                 m["loss"], m["samples_per_s"], m["eta_s"])
    if not checkpoint:
        ray.train.report(m)
        return
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=CKPT_TAG)
        if rank == 0:
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump({**m, "step": prog.step, "epoch": prog.epoch, "offset": prog.offset,
                           "world": plan.world, "seed": run.seed,
                           "mlflow_run_id": prog.mlflow_run_id}, f)
            if tracker is not None:
                tracker.write(prog.log)
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d))
    if tracker is not None:  # the checkpoint is uploaded: its steps go to MLflow
        tracker.sync(prog.log)


# --- export --------------------------------------------------------------------------------
def master_weights(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full fp32 master weights (what the optimizer updates, not the bf16/fp16 copy the
    model computes with) and the buffers, on rank 0; None elsewhere. Every rank must call it
    (ZeRO gathers the partitions)."""
    from deepspeed.utils import safe_get_full_fp32_param

    rank0 = engine.global_rank == 0
    state: dict[str, torch.Tensor] = {}
    low_precision_copy: list[tuple[str, torch.dtype]] = []
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):  # ZeRO-3 frozen parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.clone()
        if full is None:  # no ZeRO / mixed-precision partition: the parameter is the master
            full = p.data
            if full.dtype != torch.float32:
                low_precision_copy.append((name, full.dtype))
        if rank0:
            state[name] = full.detach().float().cpu().clone()
    if low_precision_copy and rank0:
        log.warning("export: no fp32 master copy for %d parameters (e.g. %s); exported "
                    "their %s values", len(low_precision_copy), *low_precision_copy[0])
    if not rank0:
        return None
    persistent = set(engine.module.state_dict())  # not e.g. BERT's position_ids
    for name, b in engine.module.named_buffers():
        if name in persistent:
            state.setdefault(name, b.detach().cpu().clone())
    return state


def _bf16_copy(src: str, dst: str) -> None:
    """Copy the HF model folder ``src`` to ``dst`` with its floating safetensors in bf16."""
    import shutil

    from safetensors.torch import load_file, save_file

    for dirpath, _, files in os.walk(src):
        out_dir = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(out_dir, exist_ok=True)
        for name in files:
            path = os.path.join(dirpath, name)
            if name.endswith(".safetensors"):
                tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                           for k, v in load_file(path).items()}
                save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
            elif name == "config.json":
                with open(path) as f:
                    cfg = json.load(f)
                cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
                with open(os.path.join(out_dir, name), "w") as f:
                    json.dump(cfg, f, indent=2)
            else:
                shutil.copy2(path, os.path.join(out_dir, name))


def export(run: TrainRun, state: dict[str, torch.Tensor]) -> None:
    """Write the fp32 master weights in HF format to ``<output>/model`` (rank 0), and with
    ``export_bf16`` a bf16 copy to ``<output>/model-bf16``."""
    uri = storage.join(run.output_uri, "model")
    fresh = run.task.build_model(run.init_uri).float()  # fp32 before the fp32 masters go in
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in fresh.state_dict().items() if k in state}
    untied = [k for k in missing if fresh.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:  # tied copies (e.g. T5 embeddings) are listed once
        raise RuntimeError(f"export: unexpected keys {unexpected[:5]}, missing {untied[:5]}")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model")
        fresh.save_pretrained(local)
        storage.upload_dir(local, uri)
        log.info("exported the fp32 master weights to %s", uri)
        if run.config.export_bf16:
            _bf16_copy(local, os.path.join(tmp, "model-bf16"))
            storage.upload_dir(os.path.join(tmp, "model-bf16"),
                               storage.join(run.output_uri, "model-bf16"))
            log.info("exported a bf16 copy to %s", storage.join(run.output_uri, "model-bf16"))


def train_loop_per_worker(config: dict[str, TrainRun]) -> None:
    """Ray Train entry; ``config``: ``{"run": TrainRun}``."""
    import ray.train

    run = config["run"]
    tc = run.config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.update(run.storage_env)
    if not tc.use_gpu:  # DeepSpeed's accelerator: the CPU, not the GPUs of the node it is on
        os.environ["DS_ACCELERATOR"] = "cpu"  # (other workers'; deepspeed is imported later)
    storage.configure()
    if sum(s.rows for s in run.shards) != run.rows:
        raise ValueError(f"TrainRun: {run.rows} rows, but its shards hold "
                         f"{sum(s.rows for s in run.shards)}")
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(run.seed + rank)
    with contextlib.ExitStack() as stack:
        restored = open_checkpoint(ray.train.get_checkpoint(), stack)
        engine, collate, plan, at, mode = restore(run, world, restored, stack)
        if restored is not None and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every worker has loaded its files before any goes
    prog = Progress(step=at.step, epoch=at.epoch, offset=at.offset, start_step=at.step,
                    resume=mode)
    tracker = None
    if rank == 0:
        prog.log = reload_metrics(run, at.step)
        prog.mlflow_run_id = restored.state.get("mlflow_run_id") if restored else None
        tracker = Tracker(run.output_uri, tc.mlflow_uri, tc.mlflow_experiment,
                          run_name=os.path.basename(run.output_uri.rstrip("/")),
                          params=tc.model_dump(mode="json"), mlflow_run_id=prog.mlflow_run_id,
                          log=prog.log, start_step=at.step)
        prog.mlflow_run_id = tracker.mlflow_run_id
    loader = Loader(run.shards, run.seed, rank, world, tc.batch_size, collate,
                    prefetch=tc.prefetch_batches)
    engine.train()
    # a failed attempt's MLflow run is marked FAILED by the driver (trainer.fit), not here:
    # this process may be killed mid-write, and MLflow's file store rewrites the run's
    # meta.yaml in place (a killed write left it empty and the resumed attempt failed)
    train(engine, run, loader, plan, prog, tracker)
    state = master_weights(engine)
    if rank == 0:
        export(run, state)
        tracker.finish()
