"""The mining driver's memory as the training queries grow, measured from outside.

    python benchmarks/mine_memory.py --out benchmarks/results/mine_memory.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once per size): ``--queries`` training queries of 8 words drawn from
the word frequencies of the bundled XQuAD English paragraphs, in parquet shards of 100,000;
their qrels: one positive each, a second for one query in 5, and a rel-0 row for one in 5.

Per (source tree, size), a child process runs what the ``mine`` stage's driver runs
(``qgscale.index.mine.mine``, with the stage's reading of queries and qrels as
``run_mine`` does it in that tree): query shards of 5,000, top 30 candidates and 8 hard
negatives each. Encoding and search are stand-ins that cost little and hold nothing (random
vectors; an exact FAISS index of 2,000 passages), so that what grows is the driver's own
memory: on a cluster they are the query encoder actor and the index shards' search actors.
A sampler thread here reads the child's RSS every 0.1 s and its USS every 0.5 s
(``before_after.measure``). Both trees must write the same shards (the sha256 of every
candidates and training shard is compared). Prints a table; writes JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save, trees  # noqa: E402

DIM, PASSAGES = 32, 2_000


def write_data(root: Path, n_queries: int, seed: int = 0) -> None:
    """``root/queries`` and ``root/qrels`` (shards of 100,000 rows)."""
    import pyarrow as pa

    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import QRELS, QUERIES

    words, probs = word_list()
    rng = np.random.default_rng(seed)
    step = 100_000
    for k, a in enumerate(range(0, n_queries, step)):
        b = min(a + step, n_queries)
        ids = [f"en:train-{i}" for i in range(a, b)]
        drawn = words[rng.choice(len(words), (b - a, 8), p=probs)]
        storage.write_parquet(str(root / "queries" / f"part-{k:05d}.parquet"), pa.table(
            {"qid": ids, "lang": ["en"] * (b - a), "text": [" ".join(w) for w in drawn]},
            schema=QUERIES))
        pos = rng.integers(PASSAGES, size=(b - a, 3))
        second, zero = rng.random(b - a) < 0.2, rng.random(b - a) < 0.2
        rows = ([(q, p[0], 1) for q, p in zip(ids, pos, strict=True)]
                + [(q, p[1], 1) for q, p, s in zip(ids, pos, second, strict=True) if s]
                + [(q, p[2], 0) for q, p, z in zip(ids, pos, zero, strict=True) if z])
        storage.write_parquet(str(root / "qrels" / f"part-{k:05d}.parquet"), pa.table(
            {"qid": [r[0] for r in rows], "pid": [f"en:{r[1]}" for r in rows],
             "rel": pa.array([r[2] for r in rows], pa.int32())}, schema=QRELS))


def stand_ins(pids: np.ndarray) -> tuple[Callable, Callable]:
    """``(encode, search)``: random query vectors seeded by a shard's first text, and an
    exact FAISS index of random vectors, one per pid."""
    import faiss

    xb = np.random.default_rng(1).standard_normal((len(pids), DIM)).astype(np.float32)
    index = faiss.IndexFlatIP(DIM)
    index.add(xb)

    def encode(texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(texts[0].encode()))
        return rng.standard_normal((len(texts), DIM)).astype(np.float32)

    def search(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = index.search(x, k)
        return pids[ids], scores

    return encode, search


def child(phase: str, data: str, out: str) -> None:
    """Mine in this process (``--child``): prints its wall time and counts as JSON."""
    from qgscale import storage
    from qgscale.index import mine as M

    encode, search = stand_ins(np.array([f"en:{i}" for i in range(PASSAGES)], dtype=object))
    t0 = time.time()
    queries, qrels = f"{data}/queries", f"{data}/qrels"
    if hasattr(M, "Positives"):  # as run_mine reads them in each tree
        args = (queries, M.Positives.read(qrels))
    else:
        args = (storage.read_parquet(queries), M.read_positives(qrels))
    m = M.mine(*args, encode, out, search, top_k=30, n_negatives=8, shard_rows=5_000,
               config_hash="bench")
    print(json.dumps({"wall_s": round(time.time() - t0, 2), "queries": m["queries"],
                      "candidates": m["candidates"], "train_examples": m["train_examples"],
                      "no_positive": m["no_positive"]}), flush=True)


def digest(out: Path) -> str:
    """One sha256 over the sha256 of every candidates and training shard, in order."""
    from qgscale import storage

    h = hashlib.sha256()
    for part in ("candidates", "train"):
        for s in storage.read_manifest(str(out / part))["shards"]:
            h.update(s["sha256"].encode())
    return h.hexdigest()[:16]


def in_trees(baseline_src: Path | None, data: Path, out: Path, script: str,
             reverse: bool = False) -> list[dict]:
    """``script``'s ``mine`` child on ``data`` with each tree (``before_after.trees``;
    ``reverse``: this one first), measured from outside, each output under ``out-<tree>`` and
    digested."""
    rows = []
    for name, src in trees(baseline_src)[::-1 if reverse else 1]:
        r = measure(src, "mine", data, Path(f"{out}-{name}"), script)
        rows.append({"tree": name, "commit": commit(src), **r,
                     "outputs_sha256": digest(Path(f"{out}-{name}"))})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = parser(__doc__, "mine_memory.json")
    ap.add_argument("--queries", type=int, nargs="+", default=[300_000, 1_000_000, 3_000_000])
    args = parse(ap, child)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-mine-mem-") as tmp:
        for nq in args.queries:
            data = Path(tmp) / f"data-q{nq}"
            write_data(data, nq)
            rows += in_trees(args.baseline_src, data, Path(tmp) / f"q{nq}", __file__)
    print(f"\n{'tree':9} {'commit':8} {'queries':>9} {'wall s':>7} {'driver RSS MB':>14} "
          f"{'driver USS MB':>14} {'outputs':>17}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['queries']:9d} {r['wall_s']:7.1f} "
              f"{r['driver_peak_rss_mb']:14.1f} {r['driver_peak_uss_mb']:14.1f} "
              f"{r['outputs_sha256']:>17}")
    same = all(len({r["outputs_sha256"] for r in rows if r["queries"] == nq}) == 1
               for nq in args.queries)
    save(args.out, {"top_k": 30, "n_negatives": 8, "shard_rows": 5_000, "rows": rows,
                    "same_outputs": same, "load_avg_start": load,
                    "load_avg_end": os.getloadavg()})
    if not same:
        sys.exit("the trees wrote different shards")


if __name__ == "__main__":
    main()
