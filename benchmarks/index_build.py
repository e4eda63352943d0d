"""Index benchmark: encode / train / add / merge throughput with 1 and 2 workers, memory,
search QPS and recall@10 of the built index against exact search, one table + JSON.

    python benchmarks/index_build.py --quick            # < 60 s on 2 cores
    python benchmarks/index_build.py --out index.json   # 1M x 384 synthetic clustered vectors

Data: synthetic clustered vectors with low intrinsic dimension (cluster centre + a 48-d
latent offset + small noise, L2-normalised), as dense-retrieval embeddings are; queries are
perturbed copies of base vectors (their source is the planted relevant passage).
``recall_at_10`` = |top-10 ∩ exact top-10| / 10; ``planted_recall_ratio`` = hit rate of the
planted passage in the top-10 relative to exact search's. Baselines (1 worker, exact search)
are measured in the same run.

Search sweeps nprobe, plain and re-ranked: the top ``10 * k_factor`` of the 4-bit fast-scan
PQ index re-scored with the exact vectors of the embedding shards (``refine="flat"``,
``faiss.IndexRefine``); 4-bit PQ alone caps recall@10 vs exact near 0.6 on this data. Each add
task runs on exactly its CPU share (faiss/OpenBLAS and Arrow threads = ``cpus_per_task``), so
add scaling needs a free core per worker: the 1-minute load average is recorded around the
timed phases (``--max-load`` / ``--wait-s`` wait for a quieter machine first), and Ray
workers run at nice 0 (``RAY_worker_niceness``) instead of Ray's default 15.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from qgscale.config import BuildConfig, EncodeConfig

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts workers at nice 15: on a shared machine any nice-0 process starves the add tasks
# and the 1 -> 2 worker ratio measures the neighbours; run them at the driver's priority
os.environ.setdefault("RAY_worker_niceness", "0")


def synthetic(n: int, dim: int, seed: int, centers: int = 1000, latent: int = 48):
    """Generator of float32 blocks of clustered, normalised vectors."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim)).astype(np.float32)
    a = (rng.normal(size=(latent, dim)) / np.sqrt(latent)).astype(np.float32)
    block = 50_000
    for start in range(0, n, block):
        m = min(block, n - start)
        x = c[rng.integers(0, centers, m)] + rng.normal(size=(m, latent)).astype(np.float32) @ a
        x += 0.05 * rng.normal(size=(m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


def write_shards(root: str, n: int, dim: int, n_shards: int) -> np.ndarray:
    from qgscale import storage
    from qgscale.index.encode import embeddings_table

    xb = np.concatenate(list(synthetic(n, dim, seed=0)))
    bounds = np.linspace(0, n, n_shards + 1).astype(int)
    for j in range(n_shards):
        a, b = bounds[j], bounds[j + 1]
        storage.write_parquet(os.path.join(root, f"part-{j:05d}.parquet"),
                              embeddings_table([f"p{i}" for i in range(a, b)], xb[a:b]))
    return xb


def bench_encode(root: str, n: int, workers: tuple[int, ...]) -> dict:
    """Passages/s of the encode stage (tiny BERT actors; actor start-up included)."""
    import pyarrow as pa

    from qgscale import storage
    from qgscale.data.schema import CORPUS
    from qgscale.index.encode import encode_corpus, load_dual_encoder
    from qgscale.models.encoder import DualEncoder
    from qgscale.models.tiny import tiny_bert, train_tokenizer, xquad_texts

    texts = xquad_texts(["en", "de"])
    tok = train_tokenizer(texts[:2000], vocab_size=2000)
    model_dir = os.path.join(root, "encoder")
    DualEncoder(tiny_bert(tok), None, tok, pooling="mean").save_pretrained(model_dir)
    corpus = os.path.join(root, "corpus")
    texts = (texts * (n // len(texts) + 1))[:n]
    for j in range(4):
        part = texts[j::4]
        storage.write_parquet(os.path.join(corpus, f"part-{j:05d}.parquet"), pa.table(
            {"pid": [f"d{j}-{i}" for i in range(len(part))], "lang": ["en"] * len(part),
             "title": [""] * len(part), "text": part}, schema=CORPUS))
    loader = functools.partial(load_dual_encoder, model_dir)
    out = {}
    for w in workers:
        start = time.time()
        encode_corpus(corpus, os.path.join(root, f"emb-text-{w}"), loader,
                      EncodeConfig(batch_size=32, num_actors=w, cpus_per_actor=1.0))
        out[w] = n / (time.time() - start)
    return out


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(a) & set(b)) for a, b in zip(ids, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


def qps(index, xq: np.ndarray, k: int = 10) -> tuple[float, np.ndarray]:
    index.search(xq[:10], k)
    start = time.time()
    ids = index.search(xq, k)[1]
    return len(xq) / (time.time() - start), ids


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait up to ``wait_s`` for the 1-minute load average to drop to ``max_load``."""
    deadline = time.time() + wait_s
    while os.getloadavg()[0] > max_load and time.time() < deadline:
        print(f"load {os.getloadavg()[0]:.2f} > {max_load}: waiting", flush=True)
        time.sleep(15)
    return round(os.getloadavg()[0], 2)


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="index_build.json")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--factory", default=None)
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--nprobe", default=None, help="comma-separated nprobe sweep")
    ap.add_argument("--k-factor", default=None, help="comma-separated refine k_factor sweep")
    ap.add_argument("--max-load", type=float, default=3.0, help="wait for this 1-min load")
    ap.add_argument("--wait-s", type=float, default=None, help="longest wait for --max-load")
    ap.add_argument("--root", default=None, help="working folder (default: a temp folder)")
    args = ap.parse_args()
    q = args.quick
    n = args.n or (100_000 if q else 1_000_000)
    # 4-bit fast-scan PQ: 8-bit PQ training takes minutes on 2 cores (see the README note)
    factory = args.factory or ("IVF128,PQ96x4fs" if q else "IVF1024,PQ96x4fs")
    n_shards = args.shards or (4 if q else 8)
    train_samples = args.train_samples or (10_000 if q else 100_000)
    nq = args.queries or (200 if q else 1000)
    nprobes = [int(x) for x in (args.nprobe or "16,32,64").split(",")]
    k_factors = [float(x) for x in (args.k_factor or ("10" if q else "4,10,20")).split(",")]
    wait_s = args.wait_s if args.wait_s is not None else (0 if q else 600)

    import faiss
    import ray

    from qgscale.index import build as B
    from qgscale.index.search import load_index

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    root = args.root or tempfile.mkdtemp(prefix="qgs-index-bench-")
    res: dict = {"n_vectors": n, "dim": args.dim, "factory": factory, "shards": n_shards,
                 "cpus": cpus, "quick": q, "refine": "flat", "load_avg_1_5_15": {}}
    try:
        t = time.time()
        enc = bench_encode(root, 100 if q else 4000, (2,) if q else (1, 2))  # quick: one run
        res["encode_passages_per_s"] = {str(k): round(v, 1) for k, v in enc.items()}
        res["encode_scaling_1_to_2"] = round(enc[2] / enc[1], 3) if 1 in enc else None
        print(f"encode done in {time.time() - t:.1f}s", flush=True)

        t = time.time()
        emb = os.path.join(root, "emb")
        xb = write_shards(emb, n, args.dim, n_shards)
        res["write_shards_s"] = round(time.time() - t, 1)
        print(f"wrote {n} vectors in {res['write_shards_s']}s", flush=True)

        runs = {}
        res["load_avg_1_5_15"]["start"] = load_avg()
        wait_for_quiet(args.max_load, wait_s)
        res["load_avg_1_5_15"]["before_build"] = load_avg()
        for workers in (1, 2):
            idx = os.path.join(root, f"index-{workers}")
            if workers == 2:  # reuse the trained index: only add/merge are compared
                os.makedirs(idx, exist_ok=True)
                for f in ("trained.faiss", "trained.json"):
                    shutil.copy(os.path.join(root, "index-1", f), os.path.join(idx, f))
            bc = BuildConfig(factory=factory, train_samples=train_samples, num_shards=1,
                             cpus_per_actor=1.0, num_actors=workers)
            runs[workers] = B.build_index(emb, idx, bc)["timings"]
            res["load_avg_1_5_15"][f"after_build_{workers}"] = load_avg()
            print(f"build with {workers} worker(s): {runs[workers]} "
                  f"(load {res['load_avg_1_5_15'][f'after_build_{workers}']})", flush=True)
        res["train_vectors_per_s"] = round(min(train_samples, n) / runs[1]["train_s"], 1)
        res["add_vectors_per_s"] = {str(w): runs[w]["add_vectors_per_s"] for w in runs}
        res["merge_vectors_per_s"] = {str(w): runs[w]["merge_vectors_per_s"] for w in runs}
        res["add_scaling_1_to_2"] = round(runs[2]["add_vectors_per_s"]
                                          / runs[1]["add_vectors_per_s"], 3)
        res["timings"] = {str(w): runs[w] for w in runs}
        index_file = os.path.join(root, "index-2", "shards", "shard-00000.faiss")
        res["index_bytes"] = os.path.getsize(index_file)
        res["estimate_gb"] = round(B.estimate(factory, n, args.dim)["index_gb"], 3)

        rng = np.random.default_rng(1)
        src = rng.choice(n, nq, replace=False)
        xq = xb[src] + 0.02 * rng.normal(size=(nq, args.dim)).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
        faiss.omp_set_num_threads(cpus)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(xb)
        del xb
        exact_qps, truth = qps(exact, xq)
        exact_planted = float(np.mean([s in row for s, row in zip(src, truth, strict=True)]))
        del exact
        res["exact_qps"] = round(exact_qps, 1)
        t = time.time()
        loaded = load_index(os.path.join(root, "index-2"), refine="flat")
        res["refine_load_s"] = round(time.time() - t, 1)
        res["load_avg_1_5_15"]["before_search"] = load_avg()
        sweep = []
        for nprobe in nprobes:
            faiss.extract_index_ivf(loaded.parts[0]).nprobe = nprobe
            for k_factor in [None, *k_factors]:  # None: the PQ index alone
                if k_factor:
                    loaded.index.k_factor = k_factor
                v, ids = qps(loaded.index if k_factor else loaded.parts[0], xq)
                planted = float(np.mean([s in row for s, row in zip(src, ids, strict=True)]))
                sweep.append({"nprobe": nprobe, "k_factor": k_factor, "qps": round(v, 1),
                              "recall_at_10": round(recall(ids, truth), 4),
                              "qps_ratio_vs_exact": round(v / exact_qps, 2),
                              "planted_recall_ratio": round(planted / max(exact_planted, 1e-9),
                                                            4)})
        res["load_avg_1_5_15"]["after_search"] = load_avg()
        res["sweep"] = sweep
        fast = [s for s in sweep if s["qps_ratio_vs_exact"] >= 10] or sweep[:1]
        best = max(fast, key=lambda s: s["recall_at_10"])  # best recall at >= 10x exact QPS
        res.update(recall_at_10=best["recall_at_10"], nprobe=best["nprobe"],
                   k_factor=best["k_factor"],
                   qps_ratio_vs_exact=best["qps_ratio_vs_exact"],
                   planted_recall_ratio=best["planted_recall_ratio"])
        res["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                          / 1024, 1)
        res["targets"] = {"add_scaling_1_to_2>=1.7": res["add_scaling_1_to_2"] >= 1.7,
                          "recall_at_10>=0.95_at_10x_qps": best["recall_at_10"] >= 0.95
                          and best["qps_ratio_vs_exact"] >= 10}
    finally:
        ray.shutdown()
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    rows = [("vectors", f"{n} x {args.dim} ({factory}, {n_shards} shards, {cpus} CPUs)"),
            ("encode passages/s by actors (tiny BERT)",
             f"{res['encode_passages_per_s']} (1 -> 2: {res['encode_scaling_1_to_2']}x)"),
            ("train vectors/s (sample + train)", res["train_vectors_per_s"]),
            ("add vectors/s 1 -> 2 workers", f"{res['add_vectors_per_s']['1']} -> "
             f"{res['add_vectors_per_s']['2']} ({res['add_scaling_1_to_2']}x)"),
            ("merge vectors/s (1 task; runs 1, 2)",
             f"{res['merge_vectors_per_s']['1']}, {res['merge_vectors_per_s']['2']}"),
            ("index size MB (estimate GB)",
             f"{res['index_bytes'] / 2**20:.1f} ({res['estimate_gb']})"),
            ("driver peak RSS MB (with the refine vectors)", res["driver_peak_rss_mb"]),
            ("load average 1/5/15 min", res["load_avg_1_5_15"]),
            ("exact QPS", res["exact_qps"])]
    rows += [(f"nprobe={s['nprobe']} refine k_factor={s['k_factor'] or '-'}: "
              "QPS (x exact) / recall@10 / planted",
              f"{s['qps']} ({s['qps_ratio_vs_exact']}x) / {s['recall_at_10']:.3f} / "
              f"{s['planted_recall_ratio']:.3f}") for s in sweep]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    print("targets:", res["targets"])
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
