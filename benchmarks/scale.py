"""Scale benchmark: the whole pipeline on a growing corpus, memory measured from outside.

    python benchmarks/scale.py --quick      # N = 20k and 200k passages
    python benchmarks/scale.py              # N = 100k and 1M passages

Data (XOR-TyDi-shaped, synthetic, :func:`generate`): a corpus of N passages of 100 words
drawn from the word frequencies of the bundled XQuAD English paragraphs (real words, not
random letters), titles of 1-3 words, in DPR's passage JSONL (``{"id", "title", "text",
"lang"}``, psgs_w100 as pyserini/DPR JSONL); a FIXED number of queries (default 1,000 train
+ 200 test, so only the corpus grows) in the XOR-TyDi row shape (``id``, ``question``,
``answers``, ``lang`` in the 7 XOR-Retrieve languages, ``split``; ``_id``/``text`` too, so
the BEIR reader takes the same file): each query is an 8-word span of its positive passage,
its answer a 2-word span of it; qrels ``qrels/{train,test}.tsv``. The pipeline reads it
with ``data.format: beir``: the one format of ``data.format`` that gives positives for a
passage collection (``xor-tydi`` gives answers but no positives on main).

The pipeline (``qgscale.pipeline.run``: all eleven stages, tiny models as in
``tests/test_pipeline.py``, Flat index, local Ray with 2 CPUs, a local root) runs in a child
process, the *driver*. A sampler thread here reads every 0.2 s the resident memory (RSS, via
psutil) of the driver and of every process below it (Ray's gcs/raylet and, below the raylet,
the Ray workers: actors, tasks, Ray Train workers), so nothing is self-reported. Samples are
attributed to the stage whose ``_stages/<stage>.json`` record (``started``, ``wall_s``) spans
them. Per N and stage: ``wall_s``, ``driver_peak_rss_mb``, ``worker_peak_rss_mb`` (the
largest single Ray worker process), ``workers_sum_peak_rss_mb`` (all workers together),
``ray_system_peak_rss_mb``, ``worker_peak_by_title`` (per Ray process title:
``ray::ShardActor.run``, ...) and ``rows_per_s`` (the stage's unit of work per second, named
in ``rows_unit``). Growth (largest N over smallest): per stage and the largest over all
stages for driver and worker peak RSS and wall time, and a linear fit per stage
(``mb = a + b * N``) evaluated at 18M and 1B passages. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
XOR_LANGS = ["ar", "bn", "fi", "ja", "ko", "ru", "te"]  # XOR-Retrieve's query languages
MB = 1 << 20


# ------------------------------------------------------------------------------ data
def word_list() -> tuple[np.ndarray, np.ndarray]:
    """(words, probabilities): whitespace tokens of the bundled XQuAD English paragraphs and
    their relative frequencies."""
    path = REPO / "qgscale" / "resources" / "xquad" / "xquad.en.json.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    counts = Counter(w for a in data for p in a["paragraphs"] for w in p["context"].split())
    words = sorted(counts)
    freq = np.array([counts[w] for w in words], dtype=np.float64)
    return np.array(words, dtype=object), freq / freq.sum()


def generate(out: str | Path, n: int, n_train: int = 1000, n_test: int = 200,
             words_per_passage: int = 100, seed: int = 0, chunk: int = 20_000
             ) -> dict[str, Any]:
    """Write the synthetic dataset under ``out`` (see the module docstring); returns counts,
    file sizes and the generation time."""
    t0 = time.time()
    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    n_q = n_train + n_test
    if n < n_q:
        raise ValueError(f"need at least {n_q} passages for {n_q} queries, got {n}")
    words, probs = word_list()
    rng = np.random.default_rng(seed)
    positives = rng.choice(n, n_q, replace=False)  # query j's positive passage
    query_of = {int(p): j for j, p in enumerate(positives)}
    queries: list[dict[str, Any] | None] = [None] * n_q
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            body = words[rng.choice(len(words), (m, words_per_passage), p=probs)]
            title_len = rng.integers(1, 4, m)
            titles = words[rng.choice(len(words), (m, 3), p=probs)]
            lines = []
            for i in range(m):
                pid = start + i
                toks = body[i].tolist()
                title = " ".join(titles[i, :title_len[i]])
                lines.append(json.dumps({"id": f"p{pid}", "title": title,
                                         "text": " ".join(toks), "lang": "en"}))
                j = query_of.get(pid)
                if j is not None:
                    s, a = (int(x) for x in rng.integers(0, words_per_passage - 8, 2))
                    question = " ".join(toks[s:s + 8])
                    split = "train" if j < n_train else "test"
                    queries[j] = {"_id": f"q{j}", "id": f"q{j}", "text": question,
                                  "question": question, "answers": [" ".join(toks[a:a + 2])],
                                  "lang": XOR_LANGS[j % len(XOR_LANGS)], "split": split,
                                  "pid": f"p{pid}"}
            f.write("\n".join(lines) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as fq, \
            open(out / "qrels" / "train.tsv", "w") as ftr, \
            open(out / "qrels" / "test.tsv", "w") as fte:
        for fr in (ftr, fte):
            fr.write("query-id\tcorpus-id\tscore\n")
        for q in queries:
            assert q is not None
            pid = q.pop("pid")
            fq.write(json.dumps(q, ensure_ascii=False) + "\n")
            (ftr if q["split"] == "train" else fte).write(f"{q['id']}\t{pid}\t1\n")
    return {"passages": n, "train_queries": n_train, "test_queries": n_test,
            "corpus_bytes": (out / "corpus.jsonl").stat().st_size,
            "generate_s": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------- sampler
SYSTEM = ("raylet", "gcs_server", "log_monitor", "monitor.py", "dashboard", "runtime_env",
          "ray_client_server", "agent.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def classify(cmdline: list[str], name: str) -> tuple[str, str]:
    """(kind, title) of a process below the driver: ``worker`` (a Ray worker: title
    ``ray::...`` or ``default_worker.py``), ``system`` (raylet, gcs, Ray's agents) or
    ``other``."""
    head = cmdline[0].split(" ")[0] if cmdline else name
    joined = " ".join(cmdline[:3])
    if any(s in joined or s in name for s in SYSTEM):
        return "system", head if head.startswith("ray::") else name
    if head.startswith("ray::"):
        return "worker", head
    if "default_worker.py" in joined:
        return "worker", "ray::(starting)"
    return "other", name


class RssSampler:
    """Samples the RSS of process ``pid`` and of all its descendants every ``interval`` s in
    a thread. A sample: ``t``, ``driver`` (bytes of ``pid`` itself) and ``procs``: one
    ``(pid, kind, title, rss)`` per descendant (:func:`classify`)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def sample(self) -> dict[str, Any] | None:
        import psutil

        try:
            driver = self.root.memory_info().rss
            children = self.root.children(recursive=True)
        except psutil.Error:  # the driver has ended
            return None
        procs = []
        for p in children:
            try:
                rss = p.memory_info().rss
                kind, title = classify(p.cmdline(), p.name())
            except psutil.Error:  # ended between the listing and the read
                continue
            procs.append((p.pid, kind, title, rss))
        return {"t": time.time(), "driver": driver, "procs": procs}

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            s = self.sample()
            if s is not None:
                self.samples.append(s)
            self._stop.wait(max(0.0, self.interval - (time.time() - t)))


def _active(titles: list[str], before: str | None) -> bool:
    """Whether a worker did work in a window: it ran an actor method (``ray::A.m``) or
    changed title (a task started, ``ray::IDLE`` -> ``ray::f``), or first appeared in it
    with a title other than ``ray::IDLE``. A process that only sat there (an idle pool
    worker, a previous stage's actor) is not active, though its memory still counts in
    ``workers_sum``."""
    if any("." in t.removeprefix("ray::") for t in titles):
        return True
    busy = [t for t in titles if t not in ("ray::IDLE", "ray::(starting)")]
    return bool(busy) and (before is None or any(t != before for t in busy))


def peaks(samples: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Peak RSS (MB) of the samples taken in [t0, t1]: the driver; the largest single
    worker that did work in the window (:func:`_active`), also per title; all workers
    together; Ray's system processes."""
    sel = [s for s in samples if t0 <= s["t"] <= t1]
    before: dict[int, str] = {}
    for s in samples:
        if s["t"] >= t0:
            break
        before.update((pid, title) for pid, _, title, _ in s["procs"])
    titles: dict[int, list[str]] = {}
    rss_of: dict[int, int] = {}
    workers_sum = system = 0
    for s in sel:
        total = sys_total = 0
        for pid, kind, title, rss in s["procs"]:
            if kind == "worker":
                titles.setdefault(pid, []).append(title)
                rss_of[pid] = max(rss_of.get(pid, 0), rss)
                total += rss
            elif kind == "system":
                sys_total += rss
        workers_sum, system = max(workers_sum, total), max(system, sys_total)
    active = [pid for pid, ts in titles.items() if _active(ts, before.get(pid))]
    by_title: dict[str, int] = {}
    for pid in active:
        for title in set(titles[pid]) - {"ray::IDLE", "ray::(starting)"}:
            by_title[title] = max(by_title.get(title, 0), rss_of[pid])
    return {"samples": len(sel),
            "driver_peak_rss_mb": round(max((s["driver"] for s in sel), default=0) / MB, 1),
            "worker_peak_rss_mb": round(max((rss_of[p] for p in active), default=0) / MB, 1),
            "workers_sum_peak_rss_mb": round(workers_sum / MB, 1),
            "ray_system_peak_rss_mb": round(system / MB, 1),
            "active_workers": len(active),
            "worker_peak_by_title": {k: round(v / MB, 1) for k, v in
                                     sorted(by_title.items(), key=lambda kv: -kv[1])}}


def title_peaks(samples: list[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """Peak RSS (MB) per Ray worker title in [t0, t1], each sample counted under the title the
    process had *at that sample* (a pooled worker's memory goes to the task it was running
    then, not to every task it ran in the window)."""
    out: dict[str, int] = {}
    for s in samples:
        if t0 <= s["t"] <= t1:
            for _, kind, title, rss in s["procs"]:
                if kind == "worker":
                    out[title] = max(out.get(title, 0), rss)
    return {k: round(v / MB, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# --------------------------------------------------------------------------- pipeline
def pipeline_config(data_dir: str, root: str, shard_rows: int = 10_000,
                    num_cpus: int = 2, ray_rows: bool = False) -> dict[str, Any]:
    """The tiny config of tests/test_pipeline.py on the synthetic BEIR-layout data
    (``ray_rows``: every training stage builds its rows with Ray Data, ``data.ray_rows_from:
    0``, instead of the driver's semi-join)."""
    tok = "xquad-tokenizer:2000"
    lengths = {"max_passage_len": 128, "max_query_len": 24, "checkpoint_every": 1000}
    return {
        "run": {"name": "scale", "seed": 3, "root": root},
        "ray": {"num_cpus": num_cpus},
        "data": {"format": "beir", "input": data_dir, "shard_rows": shard_rows,
                 **({"ray_rows_from": 0, "ray_rows_partitions": 8} if ray_rows else {})},
        "qg": {"model": {"init": {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64,
                                  "num_layers": 1, "num_decoder_layers": 1, "num_heads": 4},
                         "tokenizer": tok},
               "max_steps": 6, "batch_size": 8, "lr": 1e-3, **lengths},
        "encoder": {"model": {"init": {"model_type": "bert", "hidden_size": 32,
                                       "num_hidden_layers": 1, "num_attention_heads": 4,
                                       "intermediate_size": 64}, "tokenizer": tok},
                    "pooling": "mean", "normalize": True, "temperature": 0.1},
        "qg_rank": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "n_negatives": 2, **lengths},
        "warmup": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, **lengths,
                   "loss": {"alpha": 0.0, "beta": 0.0}},
        "distill": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, **lengths,
                    "loss": {"alpha": 1.0, "beta": 0.5, "n_candidates": 4}},
        "teacher": {"score": {"num_actors": 1, "shard_pairs": 2000, "precision": "fp32"},
                    "generate": {"langs": ["en"], "num_queries": 1, "max_new_tokens": 8,
                                 "num_actors": 1}},
        "index": {"encode": {"cpus_per_actor": 1, "batch_size": 256},
                  "build": {"factory": "Flat"}},
        "mine": {"top_k": 8, "n_negatives": 2},
        "eval": {"k": [1, 5, 10], "top_k": 10, "splits": ["test"]},
    }


def drive(config_path: str, until: str | None = None) -> None:
    """The driver process: run the pipeline of ``config_path`` (up to stage ``until``)."""
    sys.path.insert(0, str(REPO))
    from qgscale import config, logs, pipeline

    logs.console()
    cfg = config.load(config_path)
    logs.to_run_folder(cfg.run.root)
    names = pipeline.STAGE_NAMES
    for name in names[:names.index(until) + 1] if until else [None]:
        pipeline.run(cfg, only=name)


def stage_rows(stage: str, rec: dict[str, Any], n: int, data: dict[str, Any]
               ) -> tuple[int | None, str]:
    """The unit of work a stage did (for ``rows_per_s``) and its name."""
    s = rec.get("summary") or {}
    rows = data.get("rows", {})
    if stage == "prepare":
        return sum(rows.values()), "rows written"
    if stage in ("index", "reindex"):
        k = 1 if stage == "index" else max(1, len(s) if isinstance(s, dict) else 1)
        return n * k, "passages encoded + indexed"
    if stage in ("train-qg", "qg-rank", "warmup", "distill"):
        counts = s.get("counts") or {}
        return counts.get("rows"), "training rows built"
    if stage == "mine":
        return s.get("queries"), "queries mined"
    if stage == "generate":
        return s.get("rows"), "queries generated"
    if stage == "score":
        return s.get("rows") or s.get("pairs"), "pairs scored"
    if stage == "eval":
        return 3 * rows.get("test/queries", 0), "queries evaluated (3 models)"
    if stage == "rerank":
        return rows.get("test/queries"), "queries reranked"
    return None, ""


def run_one(n: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Generate the data for ``n`` passages, run the pipeline under the sampler, tabulate."""
    import yaml

    data_dir, root = work / f"data-{n}", work / f"run-{n}"
    gen = generate(data_dir, n, args.train_queries, args.test_queries, seed=args.seed)
    print(f"N={n}: data written in {gen['generate_s']} s "
          f"({gen['corpus_bytes'] / MB:.0f} MB corpus)", flush=True)
    cfg_path = work / f"scale-{n}.yaml"
    cfg_path.write_text(yaml.safe_dump(pipeline_config(str(data_dir), str(root),
                                                       args.shard_rows, args.num_cpus,
                                                       args.ray_rows)))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    load0 = [round(v, 2) for v in os.getloadavg()]
    t0 = time.time()
    with open(work / f"driver-{n}.log", "w") as log:
        until = ["--until", args.until] if args.until else []
        proc = subprocess.Popen([sys.executable, __file__, "--drive", str(cfg_path), *until],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, args.interval).start()
        rc = proc.wait()
        samples = sampler.stop()
    wall = time.time() - t0
    with gzip.open(work / f"samples-{n}.json.gz", "wt") as f:  # for a later look
        json.dump(samples, f)
    if rc != 0:
        tail = (work / f"driver-{n}.log").read_text()[-3000:]
        raise RuntimeError(f"pipeline at N={n} failed (rc={rc}):\n{tail}")
    records = {p.stem: json.loads(p.read_text()) for p in (root / "_stages").glob("*.json")}
    data = json.loads((root / "data" / "_manifest.json").read_text())
    from qgscale.pipeline import STAGE_NAMES

    stages = {}
    for name in [s for s in STAGE_NAMES if s in records]:
        rec = records[name]
        st, w = rec["started"], rec["wall_s"]
        rows, unit = stage_rows(name, rec, n, data)
        stages[name] = {"started": st, "wall_s": round(w, 2), **peaks(samples, st, st + w),
                        "rows": rows, "rows_unit": unit,
                        "rows_per_s": round(rows / w, 1) if rows else None}
    out = {"n": n, "data": gen, "total_wall_s": round(wall, 1),
           "load_avg_start": load0, "load_avg_end": [round(v, 2) for v in os.getloadavg()],
           "whole_run": peaks(samples, t0, time.time()), "stages": stages,
           "n_samples": len(samples)}
    if not args.keep:
        import shutil

        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return out


def growth(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """Ratios large/small per stage and their maximum; linear fits per stage."""
    n0, n1 = small["n"], large["n"]
    out: dict[str, Any] = {}
    for key, name in (("driver_peak_rss_mb", "driver_rss_growth"),
                      ("worker_peak_rss_mb", "worker_rss_growth"),
                      ("wall_s", "wall_growth")):
        per = {s: round(large["stages"][s][key] / small["stages"][s][key], 3)
               for s in small["stages"] if small["stages"][s][key]}
        worst = max(per, key=per.get) if per else None
        out[name] = {"max": per.get(worst), "max_stage": worst, "per_stage": per}
    fits: dict[str, Any] = {}
    for s in small["stages"]:
        fits[s] = {}
        for key in ("driver_peak_rss_mb", "worker_peak_rss_mb", "workers_sum_peak_rss_mb"):
            a0, a1 = small["stages"][s][key], large["stages"][s][key]
            b = (a1 - a0) / (n1 - n0)  # MB per passage
            a = a0 - b * n0
            fits[s][key] = {"a_mb": round(a, 1), "b_bytes_per_passage": round(b * MB, 1),
                            "at_18M_gb": round((a + max(b, 0) * 18e6) / 1024, 2),
                            "at_1B_gb": round((a + max(b, 0) * 1e9) / 1024, 1)}
    out["linear_fit"] = fits
    return out


TARGETS = {"driver": 1.25, "worker": 1.25, "wall": 12.0}
INDEX_STAGES = ("index", "reindex")  # worker growth allowed: the index's own size


def verdicts(g: dict[str, Any]) -> dict[str, dict[str, bool]]:
    out = {}
    for s in g["driver_rss_growth"]["per_stage"]:
        w = g["worker_rss_growth"]["per_stage"].get(s)
        out[s] = {"driver": g["driver_rss_growth"]["per_stage"][s] <= TARGETS["driver"],
                  "worker": s in INDEX_STAGES or w is None or w <= TARGETS["worker"],
                  "wall": g["wall_growth"]["per_stage"].get(s, 0) <= TARGETS["wall"]}
    return out


def table(results: list[dict[str, Any]], g: dict[str, Any] | None) -> str:
    ns = [r["n"] for r in results]
    head = "| stage | " + " | ".join(
        f"wall s {n:,} | driver MB | worker MB | rows/s" for n in ns)
    if g:
        head += " | driver x | worker x | wall x"
    lines = [head + " |", "|---" * (1 + 4 * len(ns) + (3 if g else 0)) + "|"]
    for s in results[0]["stages"]:
        cells = []
        for r in results:
            st = r["stages"][s]
            cells += [f"{st['wall_s']:.1f}", f"{st['driver_peak_rss_mb']:.0f}",
                      f"{st['worker_peak_rss_mb']:.0f}",
                      f"{st['rows_per_s']:,.0f}" if st["rows_per_s"] else "-"]
        if g:
            cells += [f"{g[k]['per_stage'].get(s, float('nan')):.2f}" for k in
                      ("driver_rss_growth", "worker_rss_growth", "wall_growth")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--until", default=None, help="run the stages up to this one only")
    ap.add_argument("--quick", action="store_true", help="N = 20k and 200k")
    ap.add_argument("--sizes", default=None, help="comma-separated corpus sizes")
    ap.add_argument("--train-queries", type=int, default=1000)
    ap.add_argument("--test-queries", type=int, default=200)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--ray-rows", action="store_true",
                    help="training rows built with Ray Data (data.ray_rows_from: 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep data and runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.drive:
        return drive(args.drive, args.until)
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
             else [20_000, 200_000] if args.quick else [100_000, 1_000_000])
    out_path = Path(args.out or REPO / "benchmarks" / "results" /
                    ("scale_quick.json" if args.quick else "scale.json"))
    work = Path(args.work or tempfile.mkdtemp(prefix="qgscale-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"sizes": sizes, "cpus": os.cpu_count(), "ray_rows": args.ray_rows,
                              "train_queries": args.train_queries,
                              "test_queries": args.test_queries, "shard_rows": args.shard_rows,
                              "interval_s": args.interval,
                              "load_avg_start": [round(v, 2) for v in os.getloadavg()],
                              "results": []}
    for n in sizes:
        report["results"].append(run_one(n, work, args))
        r = report["results"][-1]
        print(f"N={n}: pipeline {r['total_wall_s']} s, load {r['load_avg_start']} -> "
              f"{r['load_avg_end']}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
    g = None
    if len(sizes) > 1:
        g = growth(report["results"][0], report["results"][-1])
        report.update(g)
        report["targets"] = TARGETS
        report["meets_targets"] = verdicts(g)
    report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    out_path.write_text(json.dumps(report, indent=1))
    print(table(report["results"], g))
    print(f"load average (1, 5, 15 min): start {report['load_avg_start']}, "
          f"end {report['load_avg_end']}; wrote {out_path}")


if __name__ == "__main__":
    main()
