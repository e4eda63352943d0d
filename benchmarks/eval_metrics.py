"""The answer metrics' cost over several eval blocks: ranking metrics alone, + R@2kt / R@5kt,
+ acc@k (DPR's top-k accuracy), and both.

    python benchmarks/eval_metrics.py --out benchmarks/results/eval_metrics.json \
        [--queries 2000] [--block 500] [--baseline-src DIR]   # DIR: an older checkout

Data (synthetic, written once): a corpus of ``--passages`` passages, the 300 real DPR
``psgs_w100`` passages of ``tests/data/xor-tydi`` copied over and over, each copy ending with
its own number (no two texts are equal, so a token cache only hits a passage retrieved
again); ``--queries`` English queries, each with a top-100 run drawn at random from the
corpus, one relevant passage in it (qrels, for the ranking metrics) and one answer: for half
of them two words of one of their passages at a random rank (an answer the metrics find,
most often deep in the list), for the other half a word in no passage (the whole list is
read). One corpus language, as XOR-TyDi's and MKQA's English
Wikipedia: the pair view and the pooled view are the same run.

Per (source tree, setting) a child process scores the queries as the eval does,
``--block`` at a time (:class:`qgscale.eval.evaluate.BlockScorer`, ``eval.k`` = 1, 5, 20,
100), in the child itself (no Ray: one process does all the work the eval task's tasks
would share): wall time, the corpus shard reads that include the text column, and peak
RSS sampled from outside (psutil, every 0.1 s). ``--baseline-src`` runs the same children
with another tree first on ``PYTHONPATH`` (its commit recorded). Prints a table; writes JSON.
"""

from __future__ import annotations

import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save, trees  # noqa: E402

PSGS = REPO / "tests" / "data" / "xor-tydi" / "psgs_w100.sample.tsv"
KS = [1, 5, 20, 100]
TOP_K = 100
# setting -> (eval.answer_recall, eval.answer_accuracy)
SETTINGS = {"ranking": (False, "off"), "rkt": (True, "off"), "acc": (False, "dpr"),
            "both": (True, "dpr")}


def write_data(root: Path, n_passages: int, n_queries: int, seed: int = 0,
               shard_rows: int = 20_000) -> float:
    """The corpus, the split and its run under ``root``; returns the share of queries whose
    answer is in one of their passages."""
    from qgscale import storage
    from qgscale.data.prepare import write_tables
    from qgscale.eval.evaluate import run_table

    with open(PSGS, encoding="utf-8", newline="") as f:
        real = [(r[2], r[1]) for r in list(csv.reader(f, delimiter="\t"))[1:]]
    corpus = [{"pid": str(i), "lang": "en", "title": real[i % len(real)][0],
               "text": f"{real[i % len(real)][1]} {i}"} for i in range(n_passages)]
    rng = random.Random(seed)
    queries, answers, qrels, run = [], [], [], {}
    for q in range(n_queries):
        qid = f"q{q}"
        pids = rng.sample(range(n_passages), TOP_K)
        run[qid] = {str(p): float(TOP_K - r) for r, p in enumerate(pids)}
        if q % 2 == 0:
            words = corpus[pids[rng.randrange(TOP_K)]]["text"].split()
            at = rng.randrange(len(words) - 1)
            answer = " ".join(words[at:at + 2])
        else:
            answer = f"zzq{q}"
        queries.append({"qid": qid, "lang": "en", "text": f"question {q}"})
        qrels.append({"qid": qid, "pid": str(rng.choice(pids)), "rel": 1})
        answers.append({"qid": qid, "answers": [answer]})
    write_tables({"test/corpus": corpus, "test/queries": queries, "test/answers": answers,
                  "test/qrels": qrels}, str(root), shard_rows=shard_rows)
    storage.write_parquet(str(root / "run.parquet"), run_table(run))
    return sum(q % 2 == 0 for q in range(n_queries)) / n_queries


def child(setting: str, data: str, out: str) -> None:
    """One setting in this process (``--child``): prints its wall time, its corpus text
    reads and its metrics as JSON."""
    from qgscale import storage
    from qgscale.eval.evaluate import BlockScorer, load_split

    recall, accuracy = SETTINGS[setting]
    split = load_split(data, "test", answers=recall or accuracy != "off")
    rows = storage.read_parquet(str(Path(data) / "run.parquet")).to_pylist()
    run = {r["qid"]: dict(zip(r["pids"], r["scores"], strict=True)) for r in rows}
    block = json.loads((Path(data) / "block.json").read_text())
    reads = []
    real = storage.read_parquet

    def counting(uri, columns=None, *a, **kw):
        if "corpus" in uri and "text" in (columns or ["text"]):
            reads.append(uri)
        return real(uri, columns, *a, **kw)

    storage.read_parquet = counting
    t0 = time.time()
    try:
        scorer = BlockScorer(split, KS, answer_recall=recall, answer_accuracy=accuracy)
    except TypeError:  # a tree from before acc@k: R@kt whenever the split has answers
        if accuracy != "off":
            print(json.dumps({"wall_s": None, "metrics": {}}))
            return
        scorer = BlockScorer(split, KS)
    for start in range(0, len(split.qids), block):
        qids = split.qids[start:start + block]
        sub = {q: run[q] for q in qids}
        scorer.add(qids, sub, {("en", "en"): sub})
    got = scorer.result()["pairs"]["en->en"]
    wall = time.time() - t0
    print(json.dumps({"wall_s": round(wall, 2), "text_reads": len(reads), "metrics": got}))


def main() -> None:
    ap = parser(__doc__, "eval_metrics.json")
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=500, help="queries scored at a time")
    ap.add_argument("--shard-rows", type=int, default=20_000, help="corpus rows per shard")
    args = parse(ap, child)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        found = write_data(data, args.passages, args.queries, shard_rows=args.shard_rows)
        (data / "block.json").write_text(json.dumps(args.block))
        for name, src in trees(args.baseline_src):
            for setting in SETTINGS:
                r = measure(src, setting, data, Path(tmp) / f"{name}-{setting}", __file__)
                rows.append({"tree": name, "commit": commit(src), "setting": setting, **r})
                print({k: v for k, v in rows[-1].items() if k != "metrics"}, flush=True)
    base = {r["tree"]: r["wall_s"] for r in rows if r["setting"] == "ranking"}
    shards = -(-args.passages // args.shard_rows)
    print(f"\n{args.queries} queries in blocks of {args.block} x top {TOP_K}, {args.passages} "
          f"passages in {shards} shards, one corpus language (pair and pooled view)")
    print(f"{'tree':9} {'commit':8} {'setting':8} {'wall s':>7} {'x ranking':>9} "
          f"{'ms/query':>8} {'text reads':>10} {'peak MB':>8} {'acc@100':>8} {'r@5kt':>6}")
    for r in rows:
        m = r["metrics"]
        if r["wall_s"] is None:
            print(f"{r['tree']:9} {r['commit']:8} {r['setting']:8} (no acc@k in this tree)")
            continue
        print(f"{r['tree']:9} {r['commit']:8} {r['setting']:8} {r['wall_s']:7.1f} "
              f"{r['wall_s'] / base[r['tree']]:9.1f} {1000 * r['wall_s'] / args.queries:8.1f} "
              f"{r.get('text_reads', 0):10d} {r['driver_peak_rss_mb']:8.0f} "
              f"{m.get('acc@100', float('nan')):8.3f} {m.get('r@5kt', float('nan')):6.3f}")
    save(args.out, {"passages": args.passages, "queries": args.queries, "block": args.block,
                    "corpus_shards": shards, "top_k": TOP_K,
                    "ks": KS, "answer_in_a_passage": found, "rows": rows})


if __name__ == "__main__":
    main()
