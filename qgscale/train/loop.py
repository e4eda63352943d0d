"""``train_loop_per_worker``: DeepSpeed inside a Ray Train worker.

Steps: build the model from the run's init folder -> ``deepspeed.initialize`` with a config
generated from :class:`qgscale.config.TrainConfig` -> resume from ``ray.train.get_checkpoint()``
-> stream batches from ``ray.train.get_dataset_shard("train")`` -> every ``checkpoint_every``
optimizer steps ``engine.save_checkpoint`` into a folder reported as a ``ray.train.Checkpoint``
(every worker writes its own ZeRO shard; Ray merges the folders) -> export the final model in
HF format to storage. Rank 0 logs loss, samples/s and ETA, and keeps ``metrics.jsonl`` in the
output folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from qgscale import storage
from qgscale.train import losses

log = logging.getLogger("qgscale.train")
CKPT_TAG = "ckpt"
STATE_FILE = "qgscale_state.json"


def deepspeed_config(tc: Any, world_size: int, total_steps: int) -> dict[str, Any]:
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


def plan_steps(rows: int, world_size: int, tc: Any) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps); each worker gets ``rows // world`` rows."""
    micro = (rows // world_size) // tc.batch_size
    per_epoch = micro // tc.grad_accum
    if per_epoch == 0:
        raise ValueError(f"{rows} training rows are too few for {world_size} workers x batch "
                         f"{tc.batch_size} x grad_accum {tc.grad_accum}")
    total = per_epoch * tc.epochs
    if tc.max_steps:
        total = min(total, tc.max_steps)
    return per_epoch, total


# --- per-task steps: (engine, collated batch) -> (loss to backprop, metrics to log) --------
def student_step(engine: Any, batch: dict[str, Any], loss_cfg: Any, temperature: float,
                 world_size: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Contrastive (+ KD + alignment) loss of one micro-batch of the dual encoder."""
    b, g = batch["batch_size"], batch["group_size"]
    q, p = engine(query=batch["query"], passage=batch["passage"])
    q, p = q.float(), p.float()
    q0 = q[:b]
    con = losses.contrastive_loss(losses.gather_across_workers(q0),
                                  losses.gather_across_workers(p[:b * g]), g, temperature)
    parts = {"contrastive": con.item()}
    backward = con * world_size  # see contrastive_loss: gradient through local slices only
    kd = align = None
    has_gen = batch["has_gen"].to(q.device)
    if "cand_mask" in batch:
        mask = batch["cand_mask"].to(q.device)
        teacher = batch["teacher"].to(q.device)
        cands = p[b * g:].view(b, mask.shape[1], -1)
        s_q = torch.einsum("bd,bcd->bc", q0, cands) / temperature
        s_gen = None
        if has_gen.any():
            s_gen = torch.einsum("bd,bcd->bc", q[b:], cands) / temperature
        st, tt, mm = [s_q], [teacher], [mask]
        gen_kd = batch["has_gen_scores"].to(q.device) & has_gen
        if s_gen is not None and gen_kd.any():  # L_KD also on generated queries q'
            st.append(s_gen[gen_kd])
            tt.append(batch["gen_teacher"].to(q.device)[gen_kd])
            mm.append(mask[gen_kd])
        kd = losses.kd_loss(torch.cat(st), torch.cat(tt), tau_s=loss_cfg.tau_s,
                            tau_t=loss_cfg.tau_t, mask=torch.cat(mm))
        parts["kd"] = kd.item()
        if s_gen is not None and loss_cfg.beta:
            align = losses.alignment_loss(
                loss_cfg.align, s_q=s_q[has_gen], s_gen=s_gen[has_gen], t_q=teacher[has_gen],
                e_q=q0[has_gen], e_gen=q[b:][has_gen], tau_s=loss_cfg.tau_s,
                tau_t=loss_cfg.tau_t, symmetric=loss_cfg.symmetric, mask=mask[has_gen])
    elif has_gen.any() and loss_cfg.beta:  # embedding-level alignment needs no candidates
        align = losses.alignment_loss(loss_cfg.align, s_q=None, s_gen=None, t_q=None,
                                      e_q=q0[has_gen], e_gen=q[b:][has_gen],
                                      symmetric=loss_cfg.symmetric)
    if align is not None:
        parts["align"] = align.item()
    extra = losses.total_loss(torch.zeros((), device=q.device), kd, align, loss_cfg.alpha,
                              loss_cfg.beta)
    parts["loss"] = parts["contrastive"] + extra.item()
    return backward + extra, parts


def qg_step(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Seq2seq cross-entropy of one QG micro-batch (``QueryGenerator.forward``)."""
    loss = engine(**batch)
    return loss, {"loss": loss.item()}


# --- the loop ----------------------------------------------------------------------------
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def train_config(config: dict[str, Any]) -> Any:
    from qgscale.config import QGTrainConfig, StudentTrainConfig

    cls = QGTrainConfig if config["task"] == "qg" else StudentTrainConfig
    return cls.model_validate(config["train"])


def _build(config: dict[str, Any]) -> tuple[torch.nn.Module, Callable, Callable]:
    """Model, collator and step function for ``config["task"]`` (student | qg)."""
    from qgscale.config import LossConfig

    tc = train_config(config)
    if config["task"] == "qg":
        from qgscale.models.generator import QGCollator, QueryGenerator

        model = QueryGenerator.from_pretrained(config["init"])
        model.model.train()
        collate_rows = QGCollator(model.tokenizer, model.prompt, tc.max_passage_len,
                                  tc.max_query_len)

        def collate(batch: dict) -> dict:
            n = len(batch["query"])
            return collate_rows([{k: str(batch[k][i]) for k in ("query", "lang", "passage")}
                                 for i in range(n)])
        return model, collate, lambda engine, b, world: qg_step(engine, b)
    from qgscale.models.encoder import DualEncoder
    from qgscale.train.data import StudentCollator

    loss_cfg = LossConfig.model_validate(config["loss"])
    model = DualEncoder.from_pretrained(config["init"])
    collate = StudentCollator(model.tokenizer, tc.max_query_len, tc.max_passage_len,
                              loss_cfg.n_candidates if config.get("distill") else 0)

    def step(engine: Any, b: dict, world: int) -> tuple[torch.Tensor, dict]:
        return student_step(engine, b, loss_cfg, model.temperature, world)
    return model, collate, step


def _export_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full float32 state dict on rank 0 (ZeRO-3 gathers the partitions); None elsewhere."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().float().cpu() for k, v in state.items()}


def _maybe_fail(config: dict[str, Any], step: int, rank: int) -> None:
    """Fault injection for tests: the last worker exits hard once at ``fail_at_step``."""
    marker, at = config.get("fail_marker"), config.get("fail_at_step")
    if marker and at == step and rank == config["world_size"] - 1 and not os.path.exists(marker):
        open(marker, "w").close()
        log.warning("fault injection: worker %d exits at step %d", rank, step)
        os._exit(1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry. ``config``: task (student | qg), distill, train / loss (config dicts),
    init (model folder URI), output (URI), rows (training rows), world_size, seed,
    storage_env (S3 variables), and for tests fail_at_step / fail_marker."""
    import deepspeed
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.update(config.get("storage_env", {}))
    storage.configure()
    tc = train_config(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.get("seed", 13) + rank)
    per_epoch, total = plan_steps(config["rows"], world, tc)
    model, collate, step_fn = _build(config)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                      config=deepspeed_config(tc, world, total))
    device = engine.device

    step, metrics_log = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=CKPT_TAG)
            with open(os.path.join(d, STATE_FILE)) as f:
                step = json.load(f)["step"]
        log.info("rank %d resumed from step %d", rank, step)
    metrics_uri = storage.join(config["output"], "metrics.jsonl")
    if rank == 0 and step and storage.exists(metrics_uri):
        metrics_log = [json.loads(x) for x in storage.read_bytes(metrics_uri).splitlines()
                       if x.strip()]
        metrics_log = [m for m in metrics_log if m["step"] <= step]

    def save(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag=CKPT_TAG)
            if rank == 0:
                with open(os.path.join(d, STATE_FILE), "w") as f:
                    json.dump({"step": step, **metrics}, f)
                storage.write_bytes(metrics_uri, "".join(
                    json.dumps(m) + "\n" for m in metrics_log).encode())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    shard = ray.train.get_dataset_shard("train")
    start_step, t0, window = step, time.time(), []
    samples_per_step = tc.batch_size * tc.grad_accum * world
    engine.train()
    while step < total:
        skip = (step % per_epoch) * tc.grad_accum  # micro-batches done in this epoch
        seen = 0
        for i, raw in enumerate(shard.iter_batches(batch_size=tc.batch_size, drop_last=True,
                                                   batch_format="numpy")):
            seen += 1
            if i < skip:
                continue
            batch = _to_device(collate(raw), device)
            loss, parts = step_fn(engine, batch, world)
            engine.backward(loss)
            engine.step()
            window.append(parts)
            if engine.global_steps <= step:  # inside a gradient-accumulation window
                continue
            step = engine.global_steps
            _maybe_fail(config, step, rank)
            last = step >= total
            if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or last:
                elapsed = time.time() - t0
                rate = (step - start_step) * samples_per_step / max(elapsed, 1e-9)
                m = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[0]}
                m.update(step=step, epoch=step // per_epoch, samples_per_s=rate,
                         lr=engine.get_lr()[0], eta_s=(total - step) * samples_per_step
                         / max(rate, 1e-9), elapsed_s=elapsed)
                window = []
                metrics_log.append(m)
                if rank == 0:
                    log.info("step %d/%d loss %.4f %.1f samples/s eta %.0fs", step, total,
                             m["loss"], rate, m["eta_s"])
                if step % tc.checkpoint_every == 0 or last:
                    save(m)
                else:
                    ray.train.report(m)
            if step >= total:
                break
        if seen == 0:
            raise RuntimeError(f"rank {rank}: the training data shard is empty")

    state = _export_state(engine, tc.zero_stage)
    if rank == 0:
        export(config, state)


def export(config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Write the trained weights in HF format to ``<output>/model`` (rank 0)."""
    uri = storage.join(config["output"], "model")
    if config["task"] == "qg":
        from qgscale.models.generator import QueryGenerator

        fresh = QueryGenerator.from_pretrained(config["init"])
    else:
        from qgscale.models.encoder import DualEncoder

        fresh = DualEncoder.from_pretrained(config["init"])
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    loaded = {t.data_ptr() for k, t in fresh.state_dict().items() if k in state}
    untied = [k for k in missing if fresh.state_dict()[k].data_ptr() not in loaded]
    if unexpected or untied:  # tied copies (e.g. T5 embeddings) may be absent from ZeRO-3
        raise RuntimeError(f"export: unexpected keys {unexpected[:5]}, missing {untied[:5]}")
    fresh.save_pretrained(uri)
    log.info("exported model to %s", uri)
