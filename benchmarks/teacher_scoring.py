"""Teacher scoring throughput: naive loop vs the fast path, same model, same pairs, same run.

Pairs are XQuAD-style candidate lists (bundled English XQuAD): each question gets its own
paragraph plus ``k - 1`` paragraphs of the same and the next article, so a passage recurs
for several queries as in mined candidate lists. Pairs are processed in candidate order in
shards of ``--shard-pairs`` (what one actor call sees), so passage reuse is only counted
inside a shard; the JSON reports the reuse (pairs per distinct source per shard).

- naive: fixed batches of 32 in input order, padded to the max lengths, fp32, no grouping;
- fast: :func:`qgscale.models.generator.score_pairs` (length bucketing, token budget,
  passage grouping with shared cross-attention K/V, inference_mode, bf16 autocast on GPU);
- fast_nogroup: the fast path without passage grouping (what bucketing alone gives).

CPU: a small T5 (``--quick``: smaller still). CUDA (when present): an mT5-base-sized config
(random weights), and MFU = model FLOPs (from the config and the real token counts) / time /
measured bf16 matmul peak.

    python benchmarks/teacher_scoring.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qgscale.data.readers import bundled  # noqa: E402
from qgscale.models.generator import QueryGenerator, score_naive, score_pairs  # noqa: E402
from qgscale.models.tiny import train_tokenizer, xquad_texts  # noqa: E402


def candidate_pairs(k: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, paragraph, "en"): own paragraph + k-1 from the same and next article."""
    with gzip.open(f"{bundled('xquad')}/xquad.en.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    rng = random.Random(seed)
    pairs = []
    for a, article in enumerate(data):
        nxt = data[(a + 1) % len(data)]
        pool = [p["context"] for p in article["paragraphs"] + nxt["paragraphs"]]
        for para in article["paragraphs"]:
            others = [c for c in pool if c != para["context"]]
            for qa in para["qas"]:
                cands = [para["context"]] + rng.sample(others, min(k - 1, len(others)))
                pairs.extend((qa["question"], c, "en") for c in cands)
    return pairs


def t5_config(vocab: int, size: str):
    from transformers import T5Config

    dims = {"quick": (128, 2, 4, 512), "small": (256, 4, 4, 1024),
            "base": (768, 12, 12, 2048)}[size]  # mT5-base: d 768, 12+12 layers, d_ff 2048
    d, layers, heads, d_ff = dims
    return T5Config(vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=d_ff, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, initializer_factor=0.2)


def model_flops(cfg, src_tokens: int, src_sq: int, tgt_tokens: int, cross: int) -> float:
    """Forward FLOPs (2 per multiply-add) of real tokens only.

    ``src_tokens``: source tokens encoded (once per distinct source per batch); ``src_sq``:
    sum of squared source lengths (encoder self-attention); ``tgt_tokens``: target tokens
    decoded; ``cross``: sum over targets of target length x source length (cross-attention).
    Cross-attention K/V projections are counted once per encoded source token, as the fast
    path computes them; decoder self-attention over short queries is ignored (< 1%).
    """
    d, inner, ff, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated_act else 2) * d * ff
    enc = cfg.num_layers * (src_tokens * (4 * d * inner + mlp) + 2 * src_sq * inner)
    dec = cfg.num_decoder_layers * (tgt_tokens * (4 * d * inner + 2 * d * inner + mlp)
                                    + src_tokens * 2 * d * inner + 2 * cross * inner)
    return 2.0 * (enc + dec + tgt_tokens * d * v)


def bf16_peak(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def timed(fn, device: torch.device) -> tuple[float, float, tuple]:
    """Wall seconds, process CPU seconds (robust to other load on the machine), result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and few pairs (< 60 s)")
    ap.add_argument("--out", default="teacher_scoring.json")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--pairs", type=int, default=None, help="pairs scored by both paths")
    ap.add_argument("--fast-pairs", type=int, default=None,
                    help="pairs for the fast path alone on GPU (MFU run; default 10x --pairs)")
    ap.add_argument("--k", type=int, default=8, help="candidates per query")
    ap.add_argument("--shard-pairs", type=int, default=2000)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--max-passage-len", type=int, default=384)
    ap.add_argument("--max-query-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (best kept)")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    size = "base" if dev.type == "cuda" else ("quick" if args.quick else "small")
    n_pairs = args.pairs or {"quick": 160, "small": 1000, "base": 2000}[size]
    args.reps = args.reps or (1 if args.quick else 2)
    if args.quick and dev.type == "cuda":
        n_pairs = args.pairs or 512
    batch_tokens = args.batch_tokens or (32768 if dev.type == "cuda" else 4096)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    tok = train_tokenizer(xquad_texts(["en"]), vocab_size=4000)
    cfg = t5_config(250112 if size == "base" else len(tok), size)
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(cfg).eval().to(dev)
    qg = QueryGenerator(model, tok, max_passage_len=args.max_passage_len,
                        max_query_len=args.max_query_len)
    all_pairs = candidate_pairs(args.k)
    n_fast = min(len(all_pairs), args.fast_pairs or (10 * n_pairs if dev.type == "cuda"
                                                      else n_pairs))
    setup_s = time.perf_counter() - t0

    def shards(pairs):
        for i in range(0, len(pairs), args.shard_pairs):
            yield qg._prepare(pairs[i:i + args.shard_pairs])

    def run_fast(pairs, group=True):
        sums, ntok = [], []
        for src, tgt, ps in shards(pairs):
            s, n = score_pairs(model, src, tgt, ps, batch_tokens=batch_tokens,
                               precision="bf16", group=group, pad_id=tok.pad_token_id)
            sums.append(s)
            ntok.append(n)
        return np.concatenate(sums), np.concatenate(ntok)

    def run_naive(pairs):
        sums, ntok = [], []
        for src, tgt, ps in shards(pairs):
            s, n = score_naive(model, src, tgt, ps, batch_size=32, pad_id=tok.pad_token_id,
                               max_source_len=args.max_passage_len,
                               max_target_len=args.max_query_len)
            sums.append(s)
            ntok.append(n)
        return np.concatenate(sums), np.concatenate(ntok)

    pairs = all_pairs[:n_pairs]
    run_fast(pairs[:64])  # warm-up (allocator, kernels)
    paths = {"naive": run_naive, "fast": run_fast,
             "nogroup": lambda p: run_fast(p, group=False)}
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    outs = {}
    order = list(paths)
    for rep in range(args.reps):  # alternate the order; keep each path's best time
        for name in order if rep % 2 == 0 else order[::-1]:
            w, c, outs[name] = timed(lambda name=name: paths[name](pairs), dev)
            wall[name], cpu[name] = min(wall.get(name, w), w), min(cpu.get(name, c), c)
    (s_naive, n_naive), (s_fast, n_fast_tok) = outs["naive"], outs["fast"]
    assert (n_naive == n_fast_tok).all()
    means = s_fast / n_fast_tok
    diff = float(np.max(np.abs(means - s_naive / n_naive)))
    t_naive, t_fast, t_nogroup = wall["naive"], wall["fast"], wall["nogroup"]

    # token statistics of the fast path (per shard), for reuse and FLOPs
    def stats(pairs):
        st = dict(pairs=0, sources=0, src_tokens=0, src_sq=0, tgt_tokens=0, cross=0)
        for src, tgt, ps in shards(pairs):
            st["pairs"] += len(tgt)
            st["sources"] += len(src)
            st["src_tokens"] += sum(len(s) for s in src)
            st["src_sq"] += sum(len(s) ** 2 for s in src)
            st["tgt_tokens"] += sum(len(t) for t in tgt)
            st["cross"] += sum(len(t) * len(src[p]) for t, p in zip(tgt, ps, strict=True))
        return st

    st = stats(pairs)
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": {"size": size, "d_model": cfg.d_model, "layers": cfg.num_layers,
                  "d_ff": cfg.d_ff, "vocab": cfg.vocab_size,
                  "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)},
        "pairs": len(pairs), "k": args.k, "shard_pairs": args.shard_pairs,
        "batch_tokens": batch_tokens,
        "pairs_per_source_in_shard": round(st["pairs"] / st["sources"], 2),
        "mean_source_tokens": round(st["src_tokens"] / st["sources"], 1),
        "mean_query_tokens": round(st["tgt_tokens"] / st["pairs"], 1),
        "naive_pairs_per_s": len(pairs) / t_naive,
        "fast_pairs_per_s": len(pairs) / t_fast,
        "fast_nogroup_pairs_per_s": len(pairs) / t_nogroup,
        "speedup": t_naive / t_fast,
        "speedup_nogroup": t_naive / t_nogroup,
        "speedup_cpu_time": cpu["naive"] / cpu["fast"],
        "speedup_nogroup_cpu_time": cpu["naive"] / cpu["nogroup"],
        "reps": args.reps,
        "mean_score": float(means.mean()), "score_std": float(means.std()),
        "max_abs_score_diff_fast_vs_naive": diff,
        "precision_fast": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "setup_s": round(setup_s, 1),
    }
    if dev.type == "cuda":
        big = all_pairs[:n_fast]
        t_big, _, _ = timed(lambda: run_fast(big), dev)
        sb = stats(big)
        flops = model_flops(cfg, sb["src_tokens"], sb["src_sq"], sb["tgt_tokens"], sb["cross"])
        peak = bf16_peak(dev)
        result.update({
            "mfu_pairs": len(big), "mfu_fast_pairs_per_s": len(big) / t_big,
            "model_tflops": flops / 1e12, "achieved_tflops_per_s": flops / t_big / 1e12,
            "bf16_peak_tflops_per_s_measured": peak / 1e12, "mfu": flops / t_big / peak,
            "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30,
        })
    rows = [("naive (pad max, fp32, batch 32)", result["naive_pairs_per_s"], 1.0),
            ("fast, no passage grouping", result["fast_nogroup_pairs_per_s"],
             result["speedup_nogroup"]),
            ("fast (grouped, bucketed, budget)", result["fast_pairs_per_s"], result["speedup"])]
    print(f"device={result['device']} model={result['model']} pairs={len(pairs)} "
          f"pairs/source/shard={result['pairs_per_source_in_shard']}")
    print(f"{'path':36s} {'pairs/s':>10s} {'speedup':>8s}")
    for name, rate, sp in rows:
        print(f"{name:36s} {rate:10.1f} {sp:7.2f}x")
    print(f"speedup by process CPU time: {result['speedup_cpu_time']:.2f}x "
          f"(no grouping {result['speedup_nogroup_cpu_time']:.2f}x)")
    print(f"mean score {result['mean_score']:.3f} (std {result['score_std']:.3f}); "
          f"max |score diff| fast vs naive: {diff:.2e}")
    if "mfu" in result:
        print(f"MFU run: {result['mfu_fast_pairs_per_s']:.0f} pairs/s, "
              f"{result['achieved_tflops_per_s']:.1f} TFLOP/s of "
              f"{result['bf16_peak_tflops_per_s_measured']:.1f} measured bf16 peak -> "
              f"MFU {100 * result['mfu']:.1f}%")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
