"""Training throughput and memory per worker for DeepSpeed ZeRO 0/1/2/3.

Runs the project's training step (``qgscale.train.tasks.student_step``: dual encoder,
contrastive loss with negatives gathered across workers) under ``deepspeed.initialize`` with
the config ``qgscale.train.loop.deepspeed_config`` generates, in 2 processes (gloo on CPU;
NCCL, one process per GPU, when GPUs exist). Ray Train adds scheduling around the same loop,
not per-step cost, so it is left out here to keep the numbers about DeepSpeed.

    python benchmarks/training.py --quick --out results/training.json

Prints one table; writes JSON ``{"results": [{config, zero_stage, samples_per_s,
peak_mem_mb, vs_zero0, ...}]}``. ``--quick`` (tiny model, few steps) takes < 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, out: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    import deepspeed
    import torch.distributed as dist
    from transformers import BertConfig, BertModel

    from qgscale.config import LossConfig, TrainConfig
    from qgscale.models.encoder import DualEncoder
    from qgscale.train.batch import StudentBatch, Tokens
    from qgscale.train.loop import deepspeed_config
    from qgscale.train.tasks import student_step

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    hf = BertConfig(vocab_size=args["vocab"], max_position_embeddings=512, pad_token_id=0,
                    **CONFIGS[args["config"]])
    model = DualEncoder(BertModel(hf, add_pooling_layer=False), pooling="cls")
    tc = TrainConfig(batch_size=args["batch"], zero_stage=args["stage"],
                     precision="bf16" if gpu else "fp32", lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(tc, world, args["steps"] * 10))
    loss_cfg = LossConfig(alpha=0, beta=0)
    g, b, lq, lp = 2, args["batch"], args["qlen"], args["plen"]
    gen = torch.Generator().manual_seed(rank)

    def batch() -> StudentBatch:
        def toks(n: int, length: int) -> Tokens:
            ids = torch.randint(6, args["vocab"], (n, length), generator=gen)
            return Tokens(ids, torch.ones_like(ids))
        return StudentBatch(queries=toks(b, lq), groups=toks(b * g, lp),
                            group_size=g).to(engine.device)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args["warmup"] + args["steps"]):
        if i == args["warmup"]:
            if gpu:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        loss, _ = student_step(engine, batch(), loss_cfg, 1.0, world)
        engine.backward(loss)
        engine.step()
    if gpu:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out.put({"rank": rank, "elapsed": elapsed, "peak_mem_mb": peak,
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6
             if args["stage"] < 3 else None})
    dist.destroy_process_group()


def run_one(config: str, stage: int, world: int, steps: int, batch: int) -> dict:
    args = {"config": config, "stage": stage, "steps": steps, "warmup": 2, "batch": batch,
            "vocab": 8000 if config == "tiny" else 30000, "qlen": 16,
            "plen": 64 if config == "tiny" else 128}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    rows = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode:
            raise RuntimeError(f"zero {stage} worker exited with {p.exitcode}")
    elapsed = max(r["elapsed"] for r in rows)
    return {"config": config, "zero_stage": stage, "workers": world, "batch_per_worker": batch,
            "steps": steps, "samples_per_s": steps * batch * world / elapsed,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (< 60 s)")
    ap.add_argument("--out", default="benchmarks/results/training.json")
    ap.add_argument("--configs", default=None, help="comma-separated: tiny,base")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    gpus = torch.cuda.device_count()
    world = a.workers or (min(gpus, 2) if gpus else 2)
    configs = (a.configs.split(",") if a.configs else ["tiny"] if a.quick else ["tiny", "base"])
    steps = 5 if a.quick else 20
    results = []
    for config in configs:
        batch = 8 if config == "tiny" else 4
        base = None
        for stage in (0, 1, 2, 3):
            r = run_one(config, stage, world, steps, batch)
            base = base or r["samples_per_s"]
            r["vs_zero0"] = r["samples_per_s"] / base
            results.append(r)
            print(f"  {config} zero{stage}: {r['samples_per_s']:.1f} samples/s", flush=True)
    print(f"\n{'config':<6} {'zero':>4} {'workers':>7} {'samples/s':>10} {'vs zero0':>8} "
          f"{'peak MB/worker':>14}")
    for r in results:
        print(f"{r['config']:<6} {r['zero_stage']:>4} {r['workers']:>7} "
              f"{r['samples_per_s']:>10.1f} {r['vs_zero0']:>8.2f} {r['peak_mem_mb']:>14.0f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "training", "quick": a.quick,
                                       "results": results}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
