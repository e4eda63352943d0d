"""GPU check: qgscale's model-level hot paths on one GPU, in one short call.

Plain torch + transformers + qgscale's model code (no Ray or DeepSpeed; FAISS only in 5.),
random weights in real shapes, token ids drawn directly (no tokenizer or hub access needed):

1. **Teacher scoring** (mT5-base shape: d 768, 12+12 layers, d_ff 2048, vocab 250,112):
   queries of 8-24 tokens, 100 candidates each, passages of 100-200 tokens drawn from a pool
   so that each distinct passage recurs ``--reuse`` times on average (as in mined candidate
   lists). Naive loop (fixed batches of 32, padded to the longest passage/query in the data,
   logits at every position) vs the fast path (:func:`qgscale.models.generator.score_pairs`,
   which runs :mod:`qgscale.models.t5_scoring` for T5/mT5), each in fp32 and bf16;
   ``batch_tokens`` swept for the fast bf16 path; the same batches through the HF forward
   (``fast_hf_forward_*``, the fast path before ``t5_scoring``); eager and
   ``torch.compile`` (``teacher_compiled``).
2. **Student training step** (XLM-R-base shape, vocab 250,002): batch of 128 queries (8-32
   tokens), 1 positive + 3 hard negatives each (120-192 tokens), in-batch + hard negative
   InfoNCE through :func:`qgscale.train.tasks.student_step`, bf16 autocast, fused AdamW on
   fp32 weights; eager and ``torch.compile``.
3. **Corpus encoding**: passages of 256 tokens through the passage tower, fp16 embeddings
   copied to the host.
4. **Generation**: cross-lingual query generation with the teacher, 24 new tokens, greedy
   (beam 1) and beam 4.
5. **FAISS on the GPU** (``faiss_gpu``, last; only where faiss with GPU support is
   installed, e.g. the cluster image, else recorded as skipped): the index's GPU path.

MFU = model FLOPs / time / peak, with the FLOPs the work needs (2 per multiply-add): teacher
= encoder once per *distinct* passage (+ its cross-attention K/V) + decoder per pair on real
tokens (:func:`t5_score_flops`); student = 6 x non-embedding parameters x real tokens +
attention (:func:`encoder_train_flops`). ``mfu`` divides by the datasheet dense bf16 peak of
the card (H100/H200 SXM 989.4 TFLOP/s, H100 PCIe 756); ``mfu_vs_matmul`` by the 8192^3 bf16
matmul rate measured in this run.

    python benchmarks/gpu_check.py --out DIR          # on a GPU, < 6 minutes on one H100
    python benchmarks/gpu_check.py --tiny --out DIR   # CPU smoke run (tests run this)

Writes ``DIR/gpu_check.json`` after every section (a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qgscale.config import LossConfig  # noqa: E402
from qgscale.models import t5_scoring  # noqa: E402
from qgscale.models.encoder import DualEncoder  # noqa: E402
from qgscale.models.generator import (  # noqa: E402
    generate_ids,
    prepare_for_inference,
    score_naive,
    score_pairs,
)
from qgscale.train.batch import StudentBatch, Tokens  # noqa: E402
from qgscale.train.tasks import student_step  # noqa: E402

DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


# ----------------------------------------------------------------------------- utilities
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def peak_mem_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def datasheet_peak(name: str) -> float | None:
    for key, value in DATASHEET_BF16.items():
        if all(part in name for part in key.split()):
            return value
    return None


def matmul_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(iters)], device)
    return 2 * n**3 * iters / seconds


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


# ------------------------------------------------------------------------------ FLOPs
def t5_score_flops(cfg: Any, src_lens: list[int], pairs: list[tuple[int, int]]) -> float:
    """Forward FLOPs to score ``pairs`` = [(target length, source length)] given the distinct
    sources' lengths ``src_lens``: encoder (+ cross K/V) once per distinct source, decoder and
    LM head per real target token; decoder self-attention over <= 24 tokens is ignored."""
    d, inner, ff, vocab = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated_act else 2) * d * ff
    src = sum(src_lens)
    src_sq = sum(n * n for n in src_lens)
    tgt = sum(t for t, _ in pairs)
    cross = sum(t * s for t, s in pairs)
    enc = cfg.num_layers * (src * (4 * d * inner + mlp) + 2 * src_sq * inner)
    dec = cfg.num_decoder_layers * (tgt * (6 * d * inner + mlp) + src * 2 * d * inner
                                    + 2 * cross * inner)
    return 2.0 * (enc + dec + tgt * d * vocab)


def encoder_train_flops(cfg: Any, lens: list[int], train: bool = True) -> float:
    """(Forward + backward if ``train``) FLOPs of a BERT-style encoder on sequences of real
    lengths ``lens``: 2 x (non-embedding matmul parameters) per token + attention scores."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = layers * (4 * d * d + 2 * d * ff)
    attn = layers * 2 * d * sum(n * n for n in lens)
    forward = 2.0 * (per_token * sum(lens) + attn)
    return 3 * forward if train else forward


# ------------------------------------------------------------------------------ models
def t5_config(tiny: bool) -> Any:
    from transformers import T5Config

    d, layers, heads, d_ff, vocab = (64, 2, 4, 128, 1000) if tiny else (768, 12, 12, 2048,
                                                                        250112)
    return T5Config(vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=d_ff, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False)


def xlmr_config(tiny: bool) -> Any:
    from transformers import XLMRobertaConfig

    d, layers, heads, ff, vocab = (64, 2, 4, 128, 1000) if tiny else (768, 12, 12, 3072,
                                                                      250002)
    return XLMRobertaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=ff,
                            max_position_embeddings=514, pad_token_id=1)


def build(model_cls: Any, cfg: Any, device: torch.device, **kw: Any) -> torch.nn.Module:
    """Random weights, initialised on ``device`` (no 580M-parameter init on the host)."""
    torch.manual_seed(0)
    with torch.device(device):
        return model_cls._from_config(cfg, **kw)


def rand_ids(rng: np.random.Generator, n: int, vocab: int, eos: int | None) -> list[int]:
    ids = rng.integers(3, vocab, n).tolist()
    if eos is not None:
        ids[-1] = eos
    return ids


def pad_batch(seqs: list[list[int]], pad: int, length: int, device: torch.device
              ) -> dict[str, torch.Tensor]:
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s[:length])
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": (ids != pad).long()}


# ---------------------------------------------------------------------------- sections
_TEACHER: dict[str, Any] = {}


def teacher_setup(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The mT5-base-shaped teacher and its candidate lists (built once, shared by sections)."""
    if _TEACHER:
        return _TEACHER
    from transformers import T5ForConditionalGeneration

    cfg = t5_config(args.tiny)
    model = build(T5ForConditionalGeneration, cfg, device).eval()
    rng = np.random.default_rng(0)
    n_q, k = args.queries, args.candidates
    pool = max(k, int(n_q * k / args.reuse))
    passages = [rand_ids(rng, int(rng.integers(100, 201)), cfg.vocab_size, 1)
                for _ in range(pool)]
    queries = [rand_ids(rng, int(rng.integers(8, 25)), cfg.vocab_size, 1) for _ in range(n_q)]
    cand = [rng.choice(pool, size=k, replace=False) for _ in range(n_q)]

    def shard(qs: range) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """One actor's work unit: distinct sources, targets, and each target's source."""
        index: dict[int, int] = {}
        targets, pair_src = [], []
        for q in qs:
            for p in cand[q]:
                pair_src.append(index.setdefault(int(p), len(index)))
                targets.append(queries[q])
        return [passages[p] for p in index], targets, pair_src

    full = shard(range(n_q))
    flops = t5_score_flops(cfg, [len(s) for s in full[0]],
                           [(len(t), len(full[0][s])) for t, s in zip(full[1], full[2],
                                                                      strict=True)])
    fast_model = prepare_for_inference(copy.deepcopy(model), device, "bf16")
    cast_model = copy.deepcopy(model).to(torch.bfloat16) if device.type == "cuda" else model
    _TEACHER.update(cfg=cfg, model=model, fast_model=fast_model, cast_model=cast_model,
                    shard=shard, full=full, flops=flops,
                    max_src=max(len(p) for p in passages),
                    max_tgt=max(len(q) for q in queries))
    return _TEACHER


def teacher_scoring(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    """Naive vs fast, fp32 vs bf16. fp32 runs use the fp32 model; bf16 runs use bf16 weights
    (the naive loop: a plain cast; the fast path: :func:`prepare_for_inference`, which also
    swaps in fused RMSNorm/GELU); ``fast_autocast`` is the fast path with fp32 weights under
    autocast, as the first GPU run measured it."""
    t = teacher_setup(args, device)
    cfg, shard, full, k = t["cfg"], t["shard"], t["full"], args.candidates
    sub = shard(range(args.naive_queries))
    models = {"fp32": t["model"], "bf16": t["fast_model"]}

    def fast(data, precision: str, batch_tokens: int, model=None):
        return score_pairs(model or models[precision], *data, batch_tokens=batch_tokens,
                           precision=precision)

    def naive(data, precision: str):
        model = t["model"] if precision == "fp32" else t["cast_model"]
        return score_naive(model, *data, batch_size=32, max_source_len=t["max_src"],
                           max_target_len=t["max_tgt"], precision=precision)

    res: dict[str, Any] = {
        "model": {"shape": "mT5-base" if not args.tiny else "tiny", "d_model": cfg.d_model,
                  "layers": cfg.num_layers, "d_ff": cfg.d_ff, "vocab": cfg.vocab_size,
                  "params_m": round(sum(p.numel() for p in t["model"].parameters()) / 1e6, 1),
                  "attn_implementation": getattr(cfg, "_attn_implementation", None)},
        "queries": args.queries, "candidates_per_query": k, "pairs": len(full[1]),
        "distinct_passages": len(full[0]), "pairs_per_passage": len(full[1]) / len(full[0]),
        "naive_pairs": len(sub[1]), "passage_tokens": "100-200", "query_tokens": "8-24",
    }
    out["teacher_scoring"] = res
    fast(sub, "bf16", args.batch_tokens[0])  # warm-up: kernels, allocator, compiled lse
    naive(shard(range(1)), "bf16")
    rates, means = {}, {}
    for precision in ("fp32", "bf16"):
        sec, (s_naive, n_naive) = timed(lambda p=precision: naive(sub, p), device)
        rates[f"naive_{precision}"] = len(sub[1]) / sec
        sec, (s_fast, n_fast) = timed(
            lambda p=precision: fast(sub, p, args.batch_tokens[0]), device)
        rates[f"fast_{precision}"] = len(sub[1]) / sec
        assert (n_naive == n_fast).all()
        res[f"max_abs_diff_fast_vs_naive_{precision}"] = float(
            np.abs(s_fast / n_fast - s_naive / n_naive).max())
        means[precision] = s_fast / n_fast
    sweep = {}
    best = (0.0, args.batch_tokens[0], 0.0, 0.0)
    for bt in args.batch_tokens:
        reset_peak(device)
        try:  # best of two full passes: the first at a size still grows the allocator
            fast(shard(range(2)), "bf16", bt)
            sec, (sums, ntok) = min((timed(lambda bt=bt: fast(full, "bf16", bt), device)
                                     for _ in range(2)), key=lambda r: r[0])
        except torch.OutOfMemoryError as e:
            sweep[str(bt)] = f"OOM: {str(e)[:120]}"
            break
        sweep[str(bt)] = round(len(full[1]) / sec, 1)
        if len(full[1]) / sec > best[0]:
            best = (len(full[1]) / sec, bt, sec, peak_mem_gb(device) or 0.0)
            t["best_bf16_means"] = sums / ntok
    t["best_batch_tokens"] = best[1]
    for name, model in (("fast_autocast", t["model"]), ("fast_cast_only", t["cast_model"])):
        sec, _ = timed(lambda m=model: fast(full, "bf16", best[1], model=m), device)
        res[f"{name}_pairs_per_s"] = len(full[1]) / sec
    # the attention kernels PyTorch may pick for the biased T5 attention, one at a time
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends = {}
        for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            t5_scoring.SDPA_BACKENDS = [getattr(SDPBackend, name), SDPBackend.MATH]
            try:
                sec, _ = timed(lambda: fast(full, "bf16", best[1]), device)
                backends[name] = round(len(full[1]) / sec, 1)
            except Exception as e:  # noqa: BLE001 - record why a kernel cannot run
                backends[name] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                t5_scoring.SDPA_BACKENDS = None
        res["sdpa_backend_pairs_per_s"] = backends
    # the same batches through the HF forward (the fast path before qgscale.models.t5_scoring)
    supports, t5_scoring.supports = t5_scoring.supports, lambda _model: False
    try:
        reset_peak(device)
        sec, (sums, ntok) = timed(lambda: fast(full, "bf16", best[1]), device)
        res["fast_hf_forward_pairs_per_s"] = len(full[1]) / sec
        res["fast_hf_forward_peak_mem_gb"] = peak_mem_gb(device)
        res["max_abs_diff_t5_scoring_vs_hf_forward_bf16"] = float(
            np.abs(sums / ntok - t["best_bf16_means"]).max())
    finally:
        t5_scoring.supports = supports
    # bf16 vs fp32 rankings of each query's candidates (fast path, naive subset)
    m32, m16 = means["fp32"], means["bf16"]
    rho = [spearman(m32[i * k:(i + 1) * k], m16[i * k:(i + 1) * k])
           for i in range(args.naive_queries)]
    spread = [float(m32[i * k:(i + 1) * k].std()) for i in range(args.naive_queries)]
    res.update({
        "naive_pairs_per_s": rates["naive_bf16"], "naive_fp32_pairs_per_s": rates["naive_fp32"],
        "fast_fp32_pairs_per_s": rates["fast_fp32"], "fast_pairs_per_s": best[0],
        "fast_pairs_per_s_naive_subset": rates["fast_bf16"],
        # the target's ratio: both paths on the same pairs (the full set reuses passages more,
        # 2.3 pairs per passage vs 1.05 in the naive subset, so best / naive overstates it)
        "speedup": rates["fast_bf16"] / rates["naive_bf16"],
        "speedup_full_set_vs_naive_subset": best[0] / rates["naive_bf16"],
        "speedup_fp32": rates["fast_fp32"] / rates["naive_fp32"],
        "best_batch_tokens": best[1], "batch_tokens_sweep_pairs_per_s": sweep,
        "model_tflop": t["flops"] / 1e12, "tflops": t["flops"] / best[2] / 1e12,
        "bf16_spearman_min": float(min(rho)), "bf16_spearman_mean": float(np.mean(rho)),
        "fp32_score_spread_mean": float(np.mean(spread)),
        "max_abs_diff_bf16_vs_fp32": float(np.abs(m32 - m16).max()),
        "peak_mem_gb": best[3],
    })
    add_mfu(res, out)
    reset_peak(device)


def add_mfu(res: dict[str, Any], out: dict[str, Any]) -> None:
    """``mfu`` against the datasheet peak, ``mfu_vs_matmul`` against the measured matmul."""
    if out.get("peak_bf16_tflops") and "tflops" in res:
        res["mfu"] = res["tflops"] / out["peak_bf16_tflops"]
    if out.get("matmul_bf16_tflops") and "tflops" in res:
        res["mfu_vs_matmul"] = res["tflops"] / out["matmul_bf16_tflops"]


def teacher_profile(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    """Where the fast path's time goes: torch.profiler over one shard, table to a file."""
    from torch.profiler import ProfilerActivity, profile

    t = teacher_setup(args, device)
    data = t["shard"](range(min(10, args.queries)))
    bt = t.get("best_batch_tokens", args.batch_tokens[0])
    score_pairs(t["fast_model"], *data, batch_tokens=bt, precision="bf16")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        score_pairs(t["fast_model"], *data, batch_tokens=bt, precision="bf16")
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)
    with open(os.path.join(args.out, "teacher_profile.txt"), "w") as f:
        f.write(table)
    out["teacher_profile"] = {"file": "teacher_profile.txt", "pairs": len(data[1])}


def teacher_sdpa(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    """Which SDPA kernel each attention call of the fast path can use, and why not.

    The first H100 profile showed most attention time in ``_scaled_dot_product_attention_math``
    (24 of 36 calls). One call of each kind in a fast-path batch (self/cross, mask broadcast
    over the batch or not, dtypes, K contiguous; its shapes and strides recorded) is re-run
    with only the flash / memory-efficient kernel allowed, and PyTorch's own reasons for
    refusing it are recorded.
    """
    import warnings

    import torch.nn.functional as F  # noqa: N812
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t = teacher_setup(args, device)
    data = t["shard"](range(min(10, args.queries)))
    calls: dict[str, tuple] = {}
    counts: dict[str, int] = {}
    orig = F.scaled_dot_product_attention

    def sig(x: torch.Tensor | None) -> str:
        return "None" if x is None else f"{tuple(x.shape)}/{x.stride()}/{x.dtype}"

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        kind = (q.shape[2] == k.shape[2], None if attn_mask is None else attn_mask.shape[0] == 1,
                q.dtype, None if attn_mask is None else attn_mask.dtype, k.is_contiguous())
        calls.setdefault(str(kind), (" ".join((sig(q), sig(k), sig(attn_mask),
                                               f"causal={is_causal}", f"scale={scale}")),
                                     q, k, v, attn_mask, is_causal, scale))
        counts[str(kind)] = counts.get(str(kind), 0) + 1
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, **kw)

    F.scaled_dot_product_attention = record
    try:
        score_pairs(t["fast_model"], *data, precision="bf16",
                    batch_tokens=t.get("best_batch_tokens", args.batch_tokens[0]))
    finally:
        F.scaled_dot_product_attention = orig
    res: dict[str, Any] = {"distinct_calls": len(calls), "pairs": len(data[1]), "calls": []}
    for key, (signature, q, k, v, mask, causal, scale) in calls.items():
        entry: dict[str, Any] = {"kind": key, "example": signature, "calls": counts[key]}
        # ms per call of this kind (first call's shapes): PyTorch's pick and each fused kernel
        for name, backends in (("default", None), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                               ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
            if device.type != "cuda" and backends is not None:
                continue
            try:
                with (sdpa_kernel(backends) if backends else warnings.catch_warnings()):
                    def call(q=q, k=k, v=v, mask=mask, causal=causal, scale=scale):
                        return orig(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
                    call()
                    sec, _ = timed(lambda call=call: [call() for _ in range(10)], device)
                entry[f"ms_{name}"] = round(sec * 100, 3)
            except RuntimeError as e:
                entry[f"ms_{name}"] = f"{type(e).__name__}: {str(e)[:120]}"
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
                warnings.simplefilter("always")
                try:
                    orig(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
                    entry[backend.name] = "ok"
                except RuntimeError as e:
                    why = [str(w.message)[:300] for w in caught] or [str(e)[:300]]
                    entry[backend.name] = why
        res["calls"].append(entry)
    out["teacher_sdpa"] = res


def teacher_compiled(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    """The fast path with the T5 scoring forward's encoder and decoder blocks under
    ``torch.compile`` (``score_pairs(compiled=True)``: regional compilation with dynamic
    shapes, :func:`qgscale.models.t5_scoring.block_fns`) against eager on the same pairs (a
    quarter of the queries: the first H200 run, which compiled the whole forward, ran at 3% of
    eager's speed, so it is bounded), with dynamo's graph and recompile counters."""
    from torch._dynamo.utils import counters

    t = teacher_setup(args, device)
    model = t["fast_model"]
    data = t["shard"](range(max(1, args.queries // 4)))
    bt = t.get("best_batch_tokens", args.batch_tokens[0])
    res: dict[str, Any] = {"batch_tokens": bt, "pairs": len(data[1])}
    out["teacher_compiled"] = res

    def dynamo() -> dict[str, Any]:
        return {k: dict(v) for k, v in counters.items()
                if k in ("stats", "graph_break", "recompiles")}

    sec, _ = timed(lambda: score_pairs(model, *t["shard"](range(4)), batch_tokens=bt,
                                       precision="bf16", compiled=True), device)
    res.update(compile_s=sec, dynamo_after_compile=dynamo())
    sec, (eager, ntok) = timed(lambda: score_pairs(model, *data, batch_tokens=bt,
                                                   precision="bf16"), device)
    res["eager_pairs_per_s"] = len(data[1]) / sec
    reset_peak(device)
    sec, (sums, _) = timed(lambda: score_pairs(model, *data, batch_tokens=bt,
                                               precision="bf16", compiled=True), device)
    flops = t5_score_flops(t["cfg"], [len(s) for s in data[0]],
                           [(len(q), len(data[0][i])) for q, i in zip(data[1], data[2],
                                                                      strict=True)])
    res.update({"pairs_per_s": len(data[1]) / sec, "tflops": flops / sec / 1e12,
                "peak_mem_gb": peak_mem_gb(device), "speedup_vs_eager":
                    len(data[1]) / sec / res["eager_pairs_per_s"],
                "max_abs_diff_vs_eager": float(np.abs((sums - eager) / ntok).max()),
                "dynamo_after_run": dynamo()})
    add_mfu(res, out)
    reset_peak(device)


def student_batch(cfg: Any, args: argparse.Namespace, device: torch.device,
                  rng: np.random.Generator) -> tuple[StudentBatch, list[int]]:
    """A :class:`StudentBatch` of random ids (queries and passage groups), and its real
    lengths."""
    b, g = args.student_batch, args.group
    q_len, p_len = (32, 192)
    qs = [rand_ids(rng, int(rng.integers(8, q_len + 1)), cfg.vocab_size, None) for _ in range(b)]
    ps = [rand_ids(rng, int(rng.integers(120, p_len + 1)), cfg.vocab_size, None)
          for _ in range(b * g)]
    batch = StudentBatch(queries=Tokens(**pad_batch(qs, cfg.pad_token_id, q_len, device)),
                         groups=Tokens(**pad_batch(ps, cfg.pad_token_id, p_len, device)),
                         group_size=g)
    return batch, [len(s) for s in qs + ps]


def student_train_step(args: argparse.Namespace, device: torch.device, out: dict,
                       compiled: bool = False) -> None:
    from transformers import XLMRobertaModel

    cfg = xlmr_config(args.tiny)
    encoder = build(XLMRobertaModel, cfg, device, attn_implementation="sdpa",
                    add_pooling_layer=False)
    model = DualEncoder(encoder, pooling="cls", normalize=True, temperature=0.05).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rng = np.random.default_rng(1)
    batch, lens = student_batch(cfg, args, device, rng)
    loss_cfg = LossConfig(alpha=1.0, beta=0.0)  # contrastive only: no candidates here
    flops = encoder_train_flops(cfg, lens)
    res: dict[str, Any] = {"model": {"shape": "XLM-R-base" if not args.tiny else "tiny",
                                     "params_m": round(sum(
                                         p.numel() for p in model.parameters()) / 1e6, 1)},
                           "queries_per_step": args.student_batch,
                           "passages_per_query": args.group, "query_tokens": "8-32 (pad 32)",
                           "passage_tokens": "120-192 (pad 192)", "compiled": compiled,
                           "step_tflop": flops / 1e12}
    out["student_step_compiled" if compiled else "student_step"] = res
    if compiled:
        model.query_model = torch.compile(encoder)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = student_step(model, batch, loss_cfg, 0.05, 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak(device)
    t_warm, first = timed(lambda: [step() for _ in range(args.warmup)], device)
    sec, losses = timed(lambda: [step() for _ in range(args.steps)], device)
    res.update({"samples_per_s": args.student_batch * args.steps / sec,
                "step_s": sec / args.steps, "tflops": flops * args.steps / sec / 1e12,
                "peak_mem_gb": peak_mem_gb(device), "warmup_s": t_warm,
                "loss_first": float(first[0]), "loss_last": float(losses[-1])})
    add_mfu(res, out)
    reset_peak(device)


def student_compiled(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    student_train_step(args, device, out, compiled=True)


def corpus_encoding(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    from transformers import XLMRobertaModel

    cfg = xlmr_config(args.tiny)
    encoder = build(XLMRobertaModel, cfg, device, attn_implementation="sdpa",
                    add_pooling_layer=False).eval()
    model = DualEncoder(encoder, pooling="cls", normalize=True)
    rng = np.random.default_rng(2)
    n, bs = args.encode_passages, args.encode_batch
    batch = pad_batch([rand_ids(rng, 256, cfg.vocab_size, None) for _ in range(bs)],
                      cfg.pad_token_id, 256, device)

    @torch.inference_mode()
    def encode() -> np.ndarray:
        chunks = []
        for _ in range(n // bs):
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=device.type == "cuda"):
                emb = model.encode_passage(**batch)
            chunks.append(emb.half().cpu().numpy())
        return np.concatenate(chunks)

    res: dict[str, Any] = {"passage_tokens": 256, "batch": bs}
    out["encode"] = res
    for weights in ("fp32_autocast", "bf16"):  # the second casts the weights themselves
        if weights == "bf16" and device.type == "cuda":
            model.to(torch.bfloat16)
        encode()
        reset_peak(device)
        sec, emb = timed(encode, device)
        flops = encoder_train_flops(cfg, [256] * len(emb), train=False)
        res[weights] = {"passages_per_s": len(emb) / sec, "tflops": flops / sec / 1e12,
                        "peak_mem_gb": peak_mem_gb(device)}
        add_mfu(res[weights], out)
    best = max(("fp32_autocast", "bf16"), key=lambda w: res[w]["passages_per_s"])
    res.update(res[best], weights=best, dtype_out=str(emb.dtype))
    reset_peak(device)


def generation(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    t = teacher_setup(args, device)
    cfg, model = t["cfg"], t["fast_model"]
    rng = np.random.default_rng(3)
    ids = pad_batch([rand_ids(rng, int(rng.integers(100, 201)), cfg.vocab_size, 1)
                     for _ in range(args.gen_passages)], 0, 200, device)["input_ids"]
    res: dict[str, Any] = {"passages": args.gen_passages, "new_tokens": args.new_tokens,
                           "passage_tokens": "100-200"}
    out["generate"] = res
    for beams in (1, 4):
        def run(b=beams):
            return generate_ids(model, ids, 0, num_beams=b, max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, precision="bf16")
        generate_ids(model, ids[:2], 0, num_beams=beams, max_new_tokens=2, precision="bf16")
        t, gen = timed(run, device)
        res[f"queries_per_s_beam{beams}"] = len(gen) / t
    reset_peak(device)


def faiss_gpu(args: argparse.Namespace, device: torch.device, out: dict) -> None:
    """The index's GPU path (:mod:`qgscale.index.gpu`) where faiss with GPU support is
    installed (the cluster image; the check's own image has no faiss, so it is recorded as
    skipped): an exact fp16 Flat shard on the GPU (``to_gpu``, as a search actor holds it)
    against exact fp32 search on the CPU (recall@10 of the top-10), and IVF k-means with the
    GPU clustering index of the build's training task."""
    res: dict[str, Any] = {}
    out["faiss_gpu"] = res
    try:
        import faiss
    except ImportError:
        res["skipped"] = "faiss is not installed in this image"
        return
    from qgscale.index.gpu import faiss_gpus, to_gpu

    if device.type != "cuda" or faiss_gpus() < 1:
        res["skipped"] = "this faiss has no GPU support (or there is no GPU)"
        return
    n, d, nq = (20_000, 64, 100) if args.tiny else (2_000_000, 768, 1000)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xq = x[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d),
                                                                         dtype=np.float32)
    cpu = faiss.IndexFlatIP(d)
    cpu.add(x)
    t = time.perf_counter()
    _, truth = cpu.search(xq, 10)
    res["cpu_exact_qps"] = nq / (time.perf_counter() - t)
    t = time.perf_counter()
    gpu = to_gpu(cpu)  # fp16 Flat
    res["to_gpu_s"] = time.perf_counter() - t
    gpu.search(xq[:10], 10)
    t = time.perf_counter()
    _, got = gpu.search(xq, 10)
    res["gpu_fp16_qps"] = nq / (time.perf_counter() - t)
    res["recall_at_10_fp16_vs_fp32"] = float(np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)]))
    res["n_vectors"], res["dim"] = n, d
    del gpu, cpu
    nlist = 256 if args.tiny else 4096
    ivf = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(ivf).clustering_index = faiss.index_cpu_to_all_gpus(
        faiss.IndexFlatL2(d))
    sample = x[: min(n, 50 * nlist)]
    t = time.perf_counter()
    ivf.train(sample)
    res["ivf_train_s"], res["ivf_train_vectors"] = time.perf_counter() - t, len(sample)


# The teacher (the MFU target) first, with its diagnostics; the student's compile (slow) last.
SECTIONS = {"teacher_scoring": teacher_scoring, "teacher_sdpa": teacher_sdpa,
            "teacher_profile": teacher_profile, "teacher_compiled": teacher_compiled,
            "generate": generation, "encode": corpus_encoding,
            "student_step": student_train_step, "student_step_compiled": student_compiled,
            "faiss_gpu": faiss_gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    small = args.tiny or device.type == "cpu"
    args.queries, args.naive_queries = (6, 2) if small else (400, 20)
    args.candidates, args.reuse = 100, 2.0
    args.batch_tokens = [4096] if small else [65536, 131072, 262144, 524288]
    args.student_batch, args.group = (8, 4) if small else (128, 4)
    args.warmup, args.steps = (1, 2) if small else (3, 10)
    args.encode_passages, args.encode_batch = (32, 16) if small else (16384, 512)
    args.gen_passages, args.new_tokens = (4, 4) if small else (128, 24)
    if small and args.sections == ",".join(SECTIONS):  # no C++ compiler needed on CPU
        args.sections = ",".join(n for n in SECTIONS if "compiled" not in n)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device)
                           if device.type == "cuda" else "cpu",
                           "torch": torch.__version__, "tiny": args.tiny}
    import transformers

    out["transformers"] = transformers.__version__
    if device.type == "cuda":
        out["peak_bf16_tflops"] = (datasheet_peak(out["device"]) or 0) / 1e12 or None
        out["matmul_bf16_tflops"] = matmul_peak(device) / 1e12
    t_all = time.perf_counter()
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args, device, out)
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            traceback.print_exc()
            out.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:1000]
        out.setdefault(name, {})["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(path, "w") as f:
            json.dump(out, f, indent=2, default=float)
        print(f"[{time.perf_counter() - t_all:6.1f}s] {name}: "
              f"{json.dumps(out[name], default=float)[:600]}", flush=True)
    report(out)
    print(f"wrote {path}")


def report(out: dict) -> None:
    ts, tc = out.get("teacher_scoring", {}), out.get("teacher_compiled", {})
    st, sc = out.get("student_step", {}), out.get("student_step_compiled", {})
    en, ge = out.get("encode", {}), out.get("generate", {})

    def f(x: Any, fmt: str = "{:.1f}") -> str:
        return fmt.format(x) if isinstance(x, (int, float)) else "-"

    print(f"\ndevice {out['device']}; peak bf16 {f(out.get('peak_bf16_tflops'))} TFLOP/s "
          f"(datasheet), matmul {f(out.get('matmul_bf16_tflops'))} measured")
    rows = [
        ("teacher naive bf16 pairs/s", f(ts.get("naive_pairs_per_s")), ""),
        ("teacher fast bf16 pairs/s", f(ts.get("fast_pairs_per_s")),
         f"speedup {f(ts.get('speedup'), '{:.2f}')}x (target >= 3x)"),
        ("teacher MFU", f(ts.get("mfu"), "{:.1%}"),
         f"{f(ts.get('tflops'))} TFLOP/s (target >= 40%)"),
        ("teacher compiled pairs/s", f(tc.get("pairs_per_s")),
         f"MFU {f(tc.get('mfu'), '{:.1%}')}"),
        ("teacher bf16 Spearman min", f(ts.get("bf16_spearman_min"), "{:.4f}"),
         "target >= 0.99"),
        ("student samples/s eager", f(st.get("samples_per_s")),
         f"MFU {f(st.get('mfu'), '{:.1%}')}, {f(st.get('peak_mem_gb'))} GB"),
        ("student samples/s compiled", f(sc.get("samples_per_s")),
         f"MFU {f(sc.get('mfu'), '{:.1%}')}"),
        ("encode passages/s", f(en.get("passages_per_s")), f"MFU {f(en.get('mfu'), '{:.1%}')}"),
        ("generate queries/s beam1", f(ge.get("queries_per_s_beam1")), ""),
        ("generate queries/s beam4", f(ge.get("queries_per_s_beam4")), ""),
    ]
    for name, value, note in rows:
        print(f"{name:30s} {value:>12s}  {note}")
    errors = {k: v["error"] for k, v in out.items() if isinstance(v, dict) and "error" in v}
    for name, err in errors.items():
        print(f"ERROR {name}: {err[:300]}")


if __name__ == "__main__":
    main()
