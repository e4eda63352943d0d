"""Mining's answer check (answer-supervised data: XOR-TyDi, MKQA) as the corpus is read.

    python benchmarks/mine_answers.py --out benchmarks/results/mine_answers.json \
        [--baseline-src DIR]   # DIR: a checkout of an older qgscale, run the same way

Data (synthetic, written once): ``--passages`` passages of 100 words drawn from the word
frequencies of the bundled XQuAD English paragraphs (as ``benchmarks/scale.py``) in shards of
10,000; ``--queries`` training queries, each with one positive passage and as answer its
rarest word (which some other passages contain too, as real answers are). The retrieval is
a stand-in (random query vectors, an exact FAISS index over ``--index-passages`` passages
spread evenly over the corpus), so that what is measured is the answer check: which
retrieved passages (top 30 + 8 negatives, query shards of ``--shard-rows``) contain their
query's answer.

Per source tree a child process runs ``qgscale.index.mine.mine`` with its ``AnswerFilter``
on a local Ray of 2 CPUs (the tree's own way: before, the driver streamed the corpus once per
query shard; now one pass of shard jobs on 2 actors). A sampler thread here reads the
child's RSS / USS and its largest Ray worker's (``before_after.measure``). Both trees must
write the same shards (sha256 of every candidates and training shard). Prints a table;
writes JSON.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, parse, parser, save  # noqa: E402
from mine_memory import in_trees, stand_ins  # noqa: E402


def write_data(root: Path, n_passages: int, n_queries: int, n_index: int, seed: int = 0
               ) -> None:
    """``root/{corpus,queries,qrels,answers}`` and ``root/index_pids.txt``."""
    import pyarrow as pa

    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import word_list

    from qgscale import storage
    from qgscale.data.schema import ANSWERS, CORPUS, QRELS, QUERIES

    words, probs = word_list()
    rng = np.random.default_rng(seed)
    texts = []
    for k, a in enumerate(range(0, n_passages, 10_000)):
        b = min(a + 10_000, n_passages)
        drawn = words[rng.choice(len(words), (b - a, 100), p=probs)]
        part = [" ".join(w) for w in drawn]
        texts += part
        storage.write_parquet(str(root / "corpus" / f"part-{k:05d}.parquet"), pa.table(
            {"pid": [f"en:{i}" for i in range(a, b)], "lang": ["en"] * (b - a),
             "title": [""] * (b - a), "text": part}, schema=CORPUS))
    stride = n_passages // n_index
    (root / "index_pids.txt").write_text("\n".join(f"en:{i * stride}" for i in range(n_index)))
    pos = rng.integers(n_index, size=n_queries) * stride
    ids = [f"en:train-{j}" for j in range(n_queries)]
    rank = {w: r for r, w in enumerate(words[np.argsort(-probs)])}  # 0: the most frequent
    answers = [[max(texts[p].split(), key=rank.__getitem__)] for p in pos]  # its rarest word
    storage.write_parquet(str(root / "queries" / "part-00000.parquet"), pa.table(
        {"qid": ids, "lang": ["en"] * n_queries, "text": [a[0] for a in answers]},
        schema=QUERIES))
    storage.write_parquet(str(root / "qrels" / "part-00000.parquet"), pa.table(
        {"qid": ids, "pid": [f"en:{p}" for p in pos],
         "rel": pa.array([1] * n_queries, pa.int32())}, schema=QRELS))
    storage.write_parquet(str(root / "answers" / "part-00000.parquet"), pa.table(
        {"qid": ids, "answers": answers}, schema=ANSWERS))


def child(phase: str, data: str, out: str) -> None:
    """Mine with the answer check in this process (``--child``): prints JSON."""
    import json

    from qgscale import storage
    from qgscale.config import BM25Config
    from qgscale.index import mine as M
    from qgscale.runtime import connect

    connect(type("R", (), {"num_cpus": 2})())
    encode, search = stand_ins(np.array(Path(data, "index_pids.txt").read_text().split("\n"),
                                        dtype=object))
    t0 = time.time()
    queries, qrels = f"{data}/queries", f"{data}/qrels"
    answers, corpus = f"{data}/answers", f"{data}/corpus"
    if hasattr(M, "Positives"):  # as run_mine and the pipeline read them in each tree
        actors = BM25Config(num_actors=2, cpus_per_actor=1)
        args = (queries, M.Positives.read(qrels))
        filt = M.AnswerFilter.read(answers, corpus, "dpr", actors)
    else:
        from qgscale.retrieval.answers import read_answers

        args = (storage.read_parquet(queries), M.read_positives(qrels))
        filt = M.AnswerFilter(read_answers(answers), corpus, "dpr")
    m = M.mine(*args, encode, out, search, top_k=30, n_negatives=8,
               shard_rows=int(os.environ["MINE_SHARD_ROWS"]), config_hash="bench",
               answers=filt)
    print(json.dumps({"wall_s": round(time.time() - t0, 2), "queries": m["queries"],
                      "train_examples": m["train_examples"],
                      "answer_negatives_dropped": m["answer_negatives_dropped"]}), flush=True)


def main() -> None:
    ap = parser(__doc__, "mine_answers.json")
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--index-passages", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--shard-rows", type=int, default=2_500)
    args = parse(ap, child)
    os.environ["MINE_SHARD_ROWS"] = str(args.shard_rows)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgs-mine-ans-") as tmp:
        data = Path(tmp) / "data"
        write_data(data, args.passages, args.queries, args.index_passages)
        rows = in_trees(args.baseline_src, data, Path(tmp) / "mine", __file__)
    print(f"\n{'tree':9} {'commit':8} {'wall s':>7} {'driver USS MB':>14} "
          f"{'worker USS MB':>14} {'dropped':>8} {'outputs':>17}")
    for r in rows:
        print(f"{r['tree']:9} {r['commit']:8} {r['wall_s']:7.1f} {r['driver_peak_uss_mb']:14.1f} "
              f"{r['actor_peak_uss_mb']:14.1f} {r['answer_negatives_dropped']:8d} "
              f"{r['outputs_sha256']:>17}")
    same = len({r["outputs_sha256"] for r in rows}) == 1
    save(args.out, {"passages": args.passages, "index_passages": args.index_passages,
                    "queries": args.queries, "shard_rows": args.shard_rows, "top_k": 30,
                    "n_negatives": 8, "cpus": 2, "rows": rows, "same_outputs": same,
                    "load_avg_start": load, "load_avg_end": os.getloadavg()})
    if not same:
        sys.exit("the trees wrote different shards")


if __name__ == "__main__":
    main()
