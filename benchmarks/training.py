"""Training benchmarks, in 2 processes (gloo on CPU; NCCL, one process per GPU, with GPUs):

- ``zero``: throughput and memory per worker for DeepSpeed ZeRO 0/1/2/3 (peak RSS of each
  worker's process tree sampled from this process with psutil; on GPU also the allocator's
  peak GPU memory);
- ``input``: samples/s with tokenisation inside the training step vs prefetched (the
  workers' input pipeline, :class:`qgscale.train.order.Loader`, ``prefetch_batches`` 0 vs 2)
  on real text rows read from parquet shards;
- ``overlap``: ZeRO-2 step time with ``overlap_comm`` off vs on.

Each runs the project's training step (``qgscale.train.tasks.student_step``: dual encoder,
contrastive loss with negatives gathered across workers) under ``deepspeed.initialize`` with
the config ``qgscale.train.loop.deepspeed_config`` generates (a constant learning rate: the
schedule does not change a step's cost). Ray Train adds scheduling around the same loop, not
per-step cost, so it is left out here to keep the numbers about DeepSpeed. On GPU, ZeRO-0
runs in fp32 and ZeRO-1/2/3 in bf16 (16-bit precision needs ZeRO: ``TrainConfig``).

    python benchmarks/training.py --quick --sections input,overlap --out results/x.json

Prints a table per section; writes JSON ``{"results": [...], "input": [...], "overlap":
[...], "ratios": {...}}``. ``--quick`` (tiny models, few steps) takes a few minutes on 2
cores.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 1024},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int) -> bool:
    """This process as rank ``rank`` of a ``world``-process group on 127.0.0.1:``port``
    (NCCL on GPU, gloo on CPU); its share of the CPU threads. Returns whether a GPU is used."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    return gpu


def _worker(rank: int, world: int, port: int, args: dict, out: mp.Queue) -> None:
    gpu = _join_group(rank, world, port)
    import deepspeed
    import torch.distributed as dist
    from transformers import BertConfig, BertModel

    from qgscale.config import LossConfig, TrainConfig
    from qgscale.models.encoder import DualEncoder
    from qgscale.train.batch import StudentBatch, Tokens
    from qgscale.train.loop import deepspeed_config
    from qgscale.train.tasks import student_step

    hf = BertConfig(vocab_size=args["vocab"], max_position_embeddings=512, pad_token_id=0,
                    **CONFIGS[args["config"]])
    model = DualEncoder(BertModel(hf, add_pooling_layer=False), pooling="cls")
    tc = TrainConfig(batch_size=args["batch"], zero_stage=args["stage"],
                     # ZeRO-0 runs fp32 (16-bit precision needs ZeRO: TrainConfig)
                     precision="bf16" if gpu and args["stage"] else "fp32", lr=1e-4,
                     overlap_comm=args.get("overlap", True))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(tc, world))
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
    step_times = []
    for i in range(args["warmup"] + args["steps"]):
        if i == args["warmup"]:
            if gpu:
                torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
        ts = time.perf_counter()
        loss, _ = student_step(engine, batch(), loss_cfg, 1.0, world)
        engine.backward(loss)
        engine.step()
        if gpu:
            torch.cuda.synchronize()
        if i >= args["warmup"]:
            step_times.append(time.perf_counter() - ts)
    if gpu:
        torch.cuda.synchronize()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    out.put({"rank": rank, "elapsed": elapsed, "step_s": step_times,
             "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6
             if args["stage"] < 3 else None})
    dist.destroy_process_group()


def _spawn(target, world: int, args: dict) -> list[dict]:
    """Runs ``target`` as ranks 0..world-1 in spawned processes; their result rows (sorted by
    rank), each with ``peak_rss_mb``: the peak RSS of that worker's process tree, sampled
    from this process every 0.1 s (psutil, :class:`scale.RssSampler`), not the worker's own
    account of itself."""
    from scale import RssSampler

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, args, q)) for r in range(world)]
    samplers = []
    for p in procs:
        p.start()
        samplers.append(RssSampler(p.pid, interval=0.1).start())
    rows = sorted((q.get(timeout=900) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join(60)
        if p.exitcode:
            raise RuntimeError(f"benchmark worker exited with {p.exitcode}")
    for row, sampler in zip(rows, samplers, strict=True):
        tree = [s["driver"] + sum(rss for *_, rss in s["procs"]) for s in sampler.stop()]
        row["peak_rss_mb"] = max(tree) / 2**20 if tree else None
    return rows


def run_one(config: str, stage: int, world: int, steps: int, batch: int,
            overlap: bool = True) -> dict:
    args = {"config": config, "stage": stage, "steps": steps, "warmup": 2, "batch": batch,
            "vocab": 8000 if config != "base" else 30000, "qlen": 16,
            "plen": 128 if config == "base" else 64, "overlap": overlap}
    rows = _spawn(_worker, world, args)
    elapsed = max(r["elapsed"] for r in rows)
    step_s = [max(ts) for ts in zip(*(r["step_s"] for r in rows), strict=True)]
    return {"config": config, "zero_stage": stage, "workers": world, "batch_per_worker": batch,
            "steps": steps, "samples_per_s": steps * batch * world / elapsed,
            "step_ms_mean": 1000 * elapsed / steps,
            "step_ms_median": 1000 * sorted(step_s)[len(step_s) // 2],
            "overlap_comm": overlap,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
            "peak_gpu_mem_mb": max(r["peak_gpu_mem_mb"] for r in rows) if rows[0][
                "peak_gpu_mem_mb"] is not None else None,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# --- input pipeline: tokenisation inside the step vs prefetched -----------------------------
def _input_data(root: Path, rows: int) -> tuple[str, str]:
    """A tokenizer and ``rows`` student training rows (query, [positive, negative]) of real
    XQuAD text in 4 parquet shards under ``root``."""
    import pyarrow as pa

    from qgscale import storage
    from qgscale.models.tiny import train_tokenizer, xquad_texts
    from qgscale.train.data import STUDENT_ROWS

    texts = xquad_texts(["en", "de", "ru", "zh"])
    tok = train_tokenizer(texts[:3000], vocab_size=8000)
    tok.save_pretrained(str(root / "tok"))
    paras = [t for t in texts if len(t.split()) > 60]
    out = []
    for i in range(rows):
        words = paras[i % len(paras)].split()
        out.append({"qid": f"q{i}", "query": " ".join(words[i % 20:i % 20 + 8]),
                    "passages": [paras[i % len(paras)], paras[(i * 7 + 3) % len(paras)]],
                    "cand_texts": [], "cand_scores": [], "gen_query": "", "gen_scores": [],
                    "passage_ids": [i % len(paras), (i * 7 + 3) % len(paras)],
                    "positive_ids": [i % len(paras)]})
    table = pa.Table.from_pylist(out, schema=STUDENT_ROWS)
    for k in range(4):
        n = rows // 4
        storage.write_parquet(str(root / "data" / f"part-{k:05d}.parquet"),
                              table.slice(k * n, n))
    return str(root / "tok"), str(root / "data")


def _input_worker(rank: int, world: int, port: int, args: dict, out: mp.Queue) -> None:
    gpu = _join_group(rank, world, port)
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer, BertConfig, BertModel

    from qgscale.config import LossConfig, StudentTrainConfig
    from qgscale.models.encoder import DualEncoder
    from qgscale.train.batch import StudentCollator
    from qgscale.train.loop import deepspeed_config
    from qgscale.train.order import Loader, list_shards
    from qgscale.train.tasks import student_step

    tok = AutoTokenizer.from_pretrained(args["tok"])
    hf = BertConfig(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=0,
                    **CONFIGS[args["config"]])
    model = DualEncoder(BertModel(hf, add_pooling_layer=False), tokenizer=tok, pooling="cls")
    tc = StudentTrainConfig(batch_size=args["batch"], zero_stage=2, lr=1e-4,
                            precision="bf16" if gpu else "fp32", max_query_len=32,
                            max_passage_len=args["plen"],
                            loss=LossConfig(alpha=0, beta=0, n_hard_negatives=1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=deepspeed_config(tc, world))
    collate = StudentCollator.for_config(tok, tc, distill=False)
    result: dict = {"rank": rank}
    for prefetch in args["order"]:
        loader = Loader(list_shards(args["data"]), 13, rank, world, tc.batch_size, collate,
                        prefetch=prefetch)
        n = args["warmup"] + args["steps"]
        dist.barrier()
        t0 = time.perf_counter()
        for i, mb in enumerate(loader.epoch(0, 0, n)):
            if i == args["warmup"]:
                if gpu:
                    torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
            loss, _ = student_step(engine, mb.batch.to(engine.device), tc.loss, 1.0, world)
            engine.backward(loss)
            engine.step()
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()
        result.setdefault(prefetch, []).append(time.perf_counter() - t0)
    out.put(result)
    dist.destroy_process_group()


def run_input(config: str, world: int, steps: int, batch: int, repeats: int) -> list[dict]:
    """Samples/s of the same training steps with tokenisation inside the step (prefetch 0)
    and prefetched (2 micro-batches ahead), alternating ``repeats`` times in one process
    group; the best time of each."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok, data = _input_data(Path(d), rows=(2 + steps) * batch * world + 64)
        order = [0, 2] * repeats
        rows = _spawn(_input_worker, world, {"config": config, "tok": tok, "data": data,
                                             "batch": batch, "plen": 128, "steps": steps,
                                             "warmup": 2, "order": order})
    out = []
    for prefetch in (0, 2):
        times = [max(ts) for ts in zip(*(r[prefetch] for r in rows), strict=True)]
        best = min(times)
        out.append({"config": config, "workers": world, "batch_per_worker": batch,
                    "steps": steps, "prefetch_batches": prefetch,
                    "tokenise": "in step" if prefetch == 0 else "prefetched",
                    "samples_per_s": steps * batch * world / best,
                    "samples_per_s_all": [steps * batch * world / t for t in times],
                    "device": "cuda" if torch.cuda.is_available() else "cpu"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps")
    ap.add_argument("--out", default="benchmarks/results/training.json")
    ap.add_argument("--configs", default=None, help="zero section: comma-separated tiny,base")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--sections", default="zero,input,overlap",
                    help="comma-separated: zero,input,overlap")
    ap.add_argument("--repeats", type=int, default=3,
                    help="input/overlap: alternating repeats (best of each is reported)")
    ap.add_argument("--note", default="", help="what the machine was doing (kept in the JSON)")
    a = ap.parse_args()
    sections = a.sections.split(",")
    gpus = torch.cuda.device_count()
    world = a.workers or (min(gpus, 2) if gpus else 2)
    configs = (a.configs.split(",") if a.configs else ["tiny"] if a.quick else ["tiny", "base"])
    steps = 5 if a.quick else 20
    doc: dict = {"benchmark": "training", "quick": a.quick, "sections": sections,
                 "cpus": os.cpu_count(), "note": a.note, "results": []}
    ratios = {}
    if "zero" in sections:
        for config in configs:
            batch = 8 if config == "tiny" else 4
            base = None
            for stage in (0, 1, 2, 3):
                r = run_one(config, stage, world, steps, batch)
                base = base or r["samples_per_s"]
                r["vs_zero0"] = r["samples_per_s"] / base
                doc["results"].append(r)
                print(f"  {config} zero{stage}: {r['samples_per_s']:.1f} samples/s", flush=True)
        print(f"\n{'config':<6} {'zero':>4} {'workers':>7} {'samples/s':>10} {'vs zero0':>8} "
              f"{'peak RSS MB/worker':>18}")
        for r in doc["results"]:
            print(f"{r['config']:<6} {r['zero_stage']:>4} {r['workers']:>7} "
                  f"{r['samples_per_s']:>10.1f} {r['vs_zero0']:>8.2f} {r['peak_rss_mb']:>18.0f}")
    if "input" in sections:
        config = "tiny" if a.quick else "small"
        rows = run_input(config, world, 10 if a.quick else 30, 16, a.repeats)
        doc["input"] = rows
        ratios["prefetched_vs_in_step_samples_per_s"] = (rows[1]["samples_per_s"]
                                                         / rows[0]["samples_per_s"])
        print(f"\ninput pipeline ({config} dual encoder, {world} workers, batch 16, "
              "passages 128 tokens)")
        print(f"{'tokenise':<11} {'samples/s':>10} {'all repeats':>30}")
        for r in rows:
            print(f"{r['tokenise']:<11} {r['samples_per_s']:>10.1f} "
                  f"{' '.join(f'{x:.1f}' for x in r['samples_per_s_all']):>30}")
        print(f"prefetched / in step: {ratios['prefetched_vs_in_step_samples_per_s']:.2f}x")
    if "overlap" in sections:
        config = "small"
        n = 8 if a.quick else 20
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(a.repeats):  # alternate, so that load from elsewhere hits both
            for overlap in (False, True):
                runs[overlap].append(run_one(config, 2, world, n, 8, overlap=overlap))
        doc["overlap"] = []
        for overlap in (False, True):
            best = min(runs[overlap], key=lambda r: r["step_ms_median"])
            best["step_ms_median_all"] = [r["step_ms_median"] for r in runs[overlap]]
            doc["overlap"].append(best)
        off, on = doc["overlap"]
        ratios["overlap_on_vs_off_step_time"] = on["step_ms_median"] / off["step_ms_median"]
        print(f"\nZeRO-2 overlap_comm ({config} dual encoder, {world} workers, batch 8)")
        print(f"{'overlap_comm':<12} {'step ms (median, best run)':>27} {'all repeats':>24}")
        for r in doc["overlap"]:
            print(f"{str(r['overlap_comm']):<12} {r['step_ms_median']:>27.1f} "
                  f"{' '.join(f'{x:.1f}' for x in r['step_ms_median_all']):>24}")
        print(f"step time on / off: {ratios['overlap_on_vs_off_step_time']:.2f}x")
    doc["ratios"] = ratios
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
