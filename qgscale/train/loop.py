"""``train_loop_per_worker``: DeepSpeed inside a Ray Train worker.

One :class:`TrainRun` (task, init folder, output, row count) reaches every worker, which
sets up the DeepSpeed engine (config from :func:`deepspeed_config`) -> loads
``ray.train.get_checkpoint()`` -> trains epochs over ``ray.train.get_dataset_shard("train")``
-> every ``log_every`` optimizer steps reports metrics, every ``checkpoint_every`` also an
``engine.save_checkpoint`` folder as a ``ray.train.Checkpoint`` (every worker writes its own
ZeRO shard; Ray merges the folders) -> exports the final model in HF format to storage.
Rank 0 logs loss, samples/s and ETA, and keeps ``metrics.jsonl`` in the output folder.
"""

from __future__ import annotations

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
from qgscale.train.tasks import Task

log = logging.getLogger("qgscale.train")
CKPT_TAG = "ckpt"
STATE_FILE = "qgscale_state.json"


@dataclass(frozen=True)
class TrainRun:
    """Everything a worker needs: what to train (``task``, with its config section), the
    init model folder URI, the output folder URI, the number of training rows, the seed and
    the storage (S3) environment variables."""

    task: Task
    init_uri: str
    output_uri: str
    rows: int
    seed: int = 13
    storage_env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def config(self) -> TrainConfig:
        return self.task.config

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.output_uri, "metrics.jsonl")


def deepspeed_config(tc: TrainConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """DeepSpeed config from a ``TrainConfig`` (ZeRO, precision, accumulation, clipping,
    AdamW, linear warm-up then linear decay)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "gradient_clipping": tc.clip_grad,
        "optimizer": {"type": "AdamW", "params": {
            "lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            "torch_adam": True}},  # no CUDA extension build needed, works on CPU and GPU
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_min_lr": 0.0,
            "warmup_max_lr": tc.lr, "warmup_type": "linear",
            "warmup_num_steps": max(1, int(tc.warmup_ratio * total_steps))}},
        "zero_optimization": {"stage": tc.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.zero_stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if tc.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    return cfg


@dataclass(frozen=True)
class Plan:
    """Optimizer steps per epoch and in all, for ``world`` workers."""

    per_epoch: int
    total: int
    world: int
    samples_per_step: int


def plan_steps(rows: int, world_size: int, tc: TrainConfig) -> Plan:
    """Each worker gets ``rows // world_size`` rows; ``max_steps`` caps the total."""
    micro = (rows // world_size) // tc.batch_size
    per_epoch = micro // tc.grad_accum
    if per_epoch == 0:
        raise ValueError(f"{rows} training rows are too few for {world_size} workers x batch "
                         f"{tc.batch_size} x grad_accum {tc.grad_accum}")
    total = per_epoch * tc.epochs
    if tc.max_steps:
        total = min(total, tc.max_steps)
    return Plan(per_epoch, total, world_size, tc.batch_size * tc.grad_accum * world_size)


@dataclass
class Progress:
    """Where this worker is: optimizer steps done, the step this attempt started from (0 or
    the checkpoint it resumed), logged metrics (rank 0 writes them) and the per-micro-batch
    metrics since the last logged step."""

    step: int = 0
    start_step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    window: list[dict[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.time)


# --- the steps of a worker -------------------------------------------------------------------
def setup_engine(run: TrainRun, plan: Plan) -> tuple[Any, Callable[[dict[str, Any]], Any]]:
    """The task's model under ``deepspeed.initialize``, and its collator."""
    import deepspeed

    model = run.task.build_model(run.init_uri)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      config=deepspeed_config(run.config, plan.world,
                                                              plan.total))
    return engine, run.task.collator(model)


def load_checkpoint(engine: Any, run: TrainRun, checkpoint: Any) -> Progress:
    """Resume from a ``ray.train.Checkpoint`` (None: start at step 0); rank 0 also reloads
    the metrics logged up to that step."""
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as d:
        engine.load_checkpoint(d, tag=CKPT_TAG)
        with open(os.path.join(d, STATE_FILE)) as f:
            step = json.load(f)["step"]
    log.info("rank %d resumed from step %d", engine.global_rank, step)
    metrics: list[dict[str, Any]] = []
    if engine.global_rank == 0 and step and storage.exists(run.metrics_uri):
        metrics = [m for m in (json.loads(x) for x in
                               storage.read_bytes(run.metrics_uri).splitlines() if x.strip())
                   if m["step"] <= step]
    return Progress(step=step, start_step=step, log=metrics)


def train_epoch(engine: Any, run: TrainRun, collate: Callable[[dict[str, Any]], Any],
                shard: Any, plan: Plan, prog: Progress) -> None:
    """One pass over this worker's shard, from the micro-batch after the last one done in
    this epoch (after a resume), until the shard or ``plan.total`` steps end."""
    tc = run.config
    skip = (prog.step % plan.per_epoch) * tc.grad_accum
    seen = 0
    for i, raw in enumerate(shard.iter_batches(batch_size=tc.batch_size, drop_last=True,
                                               batch_format="numpy")):
        seen += 1
        if i < skip:
            continue
        loss, parts = run.task.step(engine, collate(raw).to(engine.device), plan.world)
        engine.backward(loss)
        engine.step()
        prog.window.append(parts)
        if engine.global_steps <= prog.step:  # inside a gradient-accumulation window
            continue
        prog.step = engine.global_steps
        last = prog.step >= plan.total
        if last or prog.step % tc.checkpoint_every == 0:
            report(engine, run, plan, prog, checkpoint=True)
        elif prog.step % tc.log_every == 0:
            report(engine, run, plan, prog, checkpoint=False)
        if last:
            break
    if seen == 0:
        raise RuntimeError(f"rank {engine.global_rank}: the training data shard is empty")


def _metrics(engine: Any, plan: Plan, prog: Progress) -> dict[str, Any]:
    """Mean of the window's per-micro-batch metrics, and progress, rate, lr and ETA."""
    elapsed = time.time() - prog.t0
    rate = (prog.step - prog.start_step) * plan.samples_per_step / max(elapsed, 1e-9)
    window, prog.window = prog.window, []
    m: dict[str, Any] = {k: sum(w.get(k, 0.0) for w in window) / len(window)
                         for k in window[0]}
    m.update(step=prog.step, epoch=prog.step // plan.per_epoch, samples_per_s=rate,
             lr=engine.get_lr()[0], eta_s=(plan.total - prog.step) * plan.samples_per_step
             / max(rate, 1e-9), elapsed_s=elapsed, start_step=prog.start_step)
    return m


def report(engine: Any, run: TrainRun, plan: Plan, prog: Progress, checkpoint: bool) -> None:
    """``ray.train.report`` the metrics since the last report; with ``checkpoint`` also the
    DeepSpeed checkpoint of every worker and (rank 0) ``metrics.jsonl``."""
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
                json.dump({"step": prog.step, **m}, f)
            storage.write_bytes(run.metrics_uri,
                                "".join(json.dumps(x) + "\n" for x in prog.log).encode())
        ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d))


def _export_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full float32 state dict on rank 0 (ZeRO-3 gathers the partitions); None elsewhere."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().float().cpu() for k, v in state.items()}


def export(run: TrainRun, state: dict[str, torch.Tensor]) -> None:
    """Write the trained weights in HF format to ``<output>/model`` (rank 0)."""
    uri = storage.join(run.output_uri, "model")
    fresh = run.task.build_model(run.init_uri)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in fresh.state_dict().items() if k in state}
    untied = [k for k in missing if fresh.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:  # tied copies (e.g. T5 embeddings) may be absent from ZeRO-3
        raise RuntimeError(f"export: unexpected keys {unexpected[:5]}, missing {untied[:5]}")
    fresh.save_pretrained(uri)
    log.info("exported model to %s", uri)


def train_loop_per_worker(config: dict[str, TrainRun]) -> None:
    """Ray Train entry; ``config``: ``{"run": TrainRun}``."""
    import ray.train

    run = config["run"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.update(run.storage_env)
    storage.configure()
    ctx = ray.train.get_context()
    torch.manual_seed(run.seed + ctx.get_world_rank())
    plan = plan_steps(run.rows, ctx.get_world_size(), run.config)
    engine, collate = setup_engine(run, plan)
    prog = load_checkpoint(engine, run, ray.train.get_checkpoint())
    shard = ray.train.get_dataset_shard("train")
    engine.train()
    while prog.step < plan.total:
        train_epoch(engine, run, collate, shard, plan, prog)
    state = _export_state(engine, run.config.zero_stage)
    if engine.global_rank == 0:
        export(run, state)
