"""Peak memory of ``qgscale data prepare --format dpr`` as the passage collection grows.

A DPR-format training file (``--queries`` questions, each 1 positive + ``--negatives`` hard
negatives with their inline text) is prepared over collections of each size in ``--sizes``
(psgs_w100.tsv layout, ~100-word passages of random words), each in a child process whose
RSS is sampled from outside (psutil, every 0.1 s). ``collection``: ``--passages`` given, the
corpus is the collection, streamed; ``inline``: the file's own passages, streamed from a
second read of the file (with ``--baseline-src DIR`` also measured with that older checkout,
as is ``collection`` over the largest collection);
``passages``, the baseline: the same collection prepared alone (``--format passages``, the
streamed reader). The file names the same passages at every size, so over a streamed
collection the driver's peak should grow as the collection alone does, not with its size.
Prints a table and writes JSON.

    python benchmarks/dpr_prepare.py [--sizes 100000 1000000 3000000] [--queries 5000]
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save, trees  # noqa: E402

WORDS = [f"w{i}" for i in range(20_000)]
SHARD_ROWS = 20_000  # a shard of rows is what the writer holds
MODES = {"inline": "dpr, inline passages", "passages": "the collection alone (baseline)",
         "collection": "dpr over the collection"}


def text(rng: random.Random, n: int = 100) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def make_data(folder: Path, sizes: list[int], queries: int, negatives: int, seed: int = 13
              ) -> dict[int, Path]:
    """Collections of each size (the smaller a prefix of the larger) and one DPR file whose
    passages are in the smallest. Returns size -> collection path."""
    rng = random.Random(seed)
    named = rng.sample(range(min(sizes)), min(min(sizes), queries * (1 + negatives)))
    titles = {p: f"Title {p}" for p in named}
    texts: dict[int, str] = {}
    paths = {n: folder / f"psgs_{n}.tsv" for n in sizes}
    files = {n: open(p, "w", encoding="utf-8") for n, p in paths.items()}
    for f in files.values():
        f.write("id\ttext\ttitle\n")
    for pid in range(max(sizes)):
        body = text(rng)
        if pid in titles:
            texts[pid] = body
        for n, f in files.items():
            if pid < n:
                f.write(f"{pid}\t{body}\tTitle {pid}\n")
    for f in files.values():
        f.close()
    records = []
    for q in range(queries):
        ids = named[q * (1 + negatives):(q + 1) * (1 + negatives)] or named[:1 + negatives]
        ctx = [{"title": titles[p], "text": texts[p], "passage_id": str(p)} for p in ids]
        records.append({"id": f"q{q}", "question": text(rng, 8), "answers": ["a"],
                        "positive_ctxs": ctx[:1], "hard_negative_ctxs": ctx[1:]})
    (folder / "train.json").write_text(json.dumps(records), encoding="utf-8")
    return paths


def child(phase: str, data: str, out: str) -> None:
    from qgscale.data.prepare import prepare

    mode, size = phase.split(":")
    coll = str(Path(data) / f"psgs_{size}.tsv")
    t0 = time.perf_counter()
    if mode == "passages":  # the baseline: the collection alone (the streamed reader)
        summary = prepare("passages", coll, out, lang="en", shard_rows=SHARD_ROWS)
    else:
        summary = prepare("dpr", str(Path(data) / "train.json"), out, lang="en",
                          corpus_langs=["en"], passages=coll if mode == "collection" else None,
                          shard_rows=SHARD_ROWS)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "rows": summary["rows"]}))


def main() -> None:
    ap = parser(__doc__, "dpr_prepare.json")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--negatives", type=int, default=30)
    args = parse(ap, child)
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        paths = make_data(data, args.sizes, args.queries, args.negatives)
        print(f"data made in {time.perf_counter() - t0:.0f} s")
        runs = []
        phases = [("inline", min(args.sizes), tree) for tree in trees(args.baseline_src)] + [
            (mode, n, ("this", REPO)) for n in args.sizes for mode in ("passages", "collection")]
        if args.baseline_src:  # dpr over the largest collection, with the older checkout too
            phases.append(("collection", max(args.sizes), trees(args.baseline_src)[0]))
        for mode, size, (tree, src) in phases:
            res = measure(src, f"{mode}:{size}", data, data / f"out-{mode}-{size}-{tree}", script)
            res.update(mode=mode, tree=tree, commit=commit(src),
                       collection=size if mode != "inline" else None,
                       collection_mb=round(paths[size].stat().st_size / (1 << 20), 1))
            runs.append(res)
            print(json.dumps(res))
    def growth(mode: str) -> float:
        peaks = [r["driver_peak_rss_mb"] for r in runs if r["mode"] == mode and r["tree"] == "this"]
        return round(peaks[-1] / peaks[0], 3)

    over = {r["collection"]: r["driver_peak_rss_mb"] for r in runs
            if r["mode"] == "collection" and r["tree"] == "this"}
    alone = {r["collection"]: r["driver_peak_rss_mb"] for r in runs if r["mode"] == "passages"}
    print(f"\n{args.queries} queries x (1 + {args.negatives}) passages named; commit "
          f"{commit(REPO)}\n")
    print("| prepare | collection passages | MB on disk | corpus rows | wall s | "
          "driver peak MB |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {MODES[r['mode']]} ({r['commit']}) | {r['collection'] or '-'} | "
              f"{r['collection_mb'] if r['collection'] else '-'} | "
              f"{r['rows']['corpus']:,} | {r['seconds']} | {r['driver_peak_rss_mb']} |")
    summary = {"driver_peak_growth": growth("collection"),
               "driver_peak_growth_passages_alone": growth("passages"),
               "dpr_over_collection_vs_alone_mb": {n: round(over[n] - alone[n], 1)
                                                   for n in over}}
    print(f"\ndriver peak, largest vs smallest collection: dpr over it "
          f"{summary['driver_peak_growth']:.2f}x, the collection alone "
          f"{summary['driver_peak_growth_passages_alone']:.2f}x; dpr over it minus the "
          f"collection alone, MB: {summary['dpr_over_collection_vs_alone_mb']}")
    save(args.out, {"commit": commit(REPO), "queries": args.queries,
                    "negatives": args.negatives, "sizes": args.sizes,
                    "shard_rows": SHARD_ROWS, **summary, "runs": runs})


if __name__ == "__main__":
    main()
