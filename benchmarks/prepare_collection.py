"""Wall time and memory of ``qgscale data prepare --format passages`` (or ``--format jsonl
--kind corpus``) of one large collection: one stream (the baseline) against its byte-range
units on Ray tasks.

A psgs_w100.tsv-style collection of ``--passages`` passages (~100 random words each, with
``--dups`` later copies of earlier ids and ``--bad`` malformed rows, ``on_error: skip``; with
``--format jsonl`` the same rows as canonical corpus JSONL, a bad row lacking its text) is
prepared in child processes whose RSS is sampled from outside (psutil over the process tree,
every 0.1 s; ``ray::`` workers reported apart): ``baseline`` -- the older checkout given as
``--baseline-src`` (one stream, ids checked by sorted runs); ``units`` -- this checkout
without Ray (the units one after another in the process); ``ray`` -- this checkout on a local
Ray of ``--cpus`` CPUs (one task per unit; the Ray start-up is timed apart). Every run's
corpus (its shards in manifest order) and rejected rows must be identical.

    python benchmarks/prepare_collection.py --baseline-src /tmp/bl-src [--passages 2000000]
        [--format jsonl]  (writes results/prepare_collection_jsonl.json)
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save, trees  # noqa: E402

WORDS = [f"w{i}" for i in range(20_000)]
SHARD_ROWS = 20_000


FILES = {"passages": "psgs.tsv", "jsonl": "corpus.jsonl"}  # the collection, by format


def make_collection(path: Path, n: int, dups: int, bad: int, seed: int = 5) -> None:
    """A TSV with a header (``.tsv``) or canonical corpus JSONL (``.jsonl``)."""
    rng = random.Random(seed)
    copies = {rng.randrange(1, n): rng.randrange(0, n // 2) for _ in range(dups)}
    broken = set(rng.sample(range(n), bad))
    jsonl = path.suffix == ".jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write("" if jsonl else "id\ttext\ttitle\n")
        for i in range(n):
            if i in broken:
                f.write(json.dumps({"pid": f"bad{i}", "lang": "en"}) + "\n" if jsonl else
                        f"bad{i}\tonly two columns\n")
            pid = copies.get(i, i) if copies.get(i, n) < i else i
            text = " ".join(rng.choices(WORDS, k=100))
            f.write(json.dumps({"pid": str(pid), "lang": "en", "title": f"Title {i}",
                                "text": text}) + "\n" if jsonl else
                    f"{pid}\t{text}\tTitle {i}\n")


def child(phase: str, data: str, out: str) -> None:
    name, *rest = phase.split(":")
    cpus = int(rest[0]) if name == "ray" else 0
    if rest[-1:] and rest[-1].startswith("u"):  # --unit-bytes: the units' size, not the default
        from qgscale.data import collection

        collection.UNIT_BYTES = collection.MIN_UNIT_BYTES = int(rest[-1][1:])
    ray_s = 0.0
    if cpus:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_s = time.perf_counter() - t0
    from qgscale import storage
    from qgscale.data.prepare import prepare

    fmt = next(f for f, name in FILES.items() if (Path(data) / name).exists())
    t0 = time.perf_counter()
    summary = prepare(fmt, str(Path(data) / FILES[fmt]), out, shard_rows=SHARD_ROWS,
                      on_error="skip", **({"kind": "corpus"} if fmt == "jsonl" else
                                          {"lang": "en"}))
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256()
    corpus = f"{out}/corpus"
    for shard in storage.read_manifest(corpus)["shards"]:
        for row in storage.read_parquet(f"{corpus}/{shard['file']}").to_pylist():
            digest.update(json.dumps(row, sort_keys=True).encode())  # rows, whatever the shards
    rejected = Path(out, "_rejected.jsonl")
    lines = rejected.read_text(encoding="utf-8").splitlines() if rejected.exists() else []
    rej = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]  # in order, raw included
    print(json.dumps({"seconds": round(seconds, 2), "ray_start_s": round(ray_s, 2),
                      "rows": summary["rows"]["corpus"], "rejected": summary["rejected"],
                      "corpus_sha": digest.hexdigest()[:16], "rejected_sha": rej}))


def main() -> None:
    ap = parser(__doc__, "prepare_collection.json")
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--dups", type=int, default=200)
    ap.add_argument("--bad", type=int, default=20)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--format", choices=sorted(FILES), default="passages")
    ap.add_argument("--unit-bytes", type=int, default=None,
                    help="bytes per unit (default: prepare's own, 4 units per CPU, 32-256 MB)")
    args = parse(ap, child)
    if args.format == "jsonl" and args.out == ap.get_default("out"):
        args.out = str(Path(args.out).with_name("prepare_collection_jsonl.json"))
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t0 = time.perf_counter()
        path = data / FILES[args.format]
        make_collection(path, args.passages, args.dups, args.bad)
        mb = round(path.stat().st_size / (1 << 20), 1)
        print(f"collection: {args.passages:,} passages, {mb} MB, made in "
              f"{time.perf_counter() - t0:.0f} s")
        unit = f":u{args.unit_bytes}" if args.unit_bytes else ""
        phases = [("stream" if tree == "baseline" else "units" + unit, tree, src)
                  for tree, src in trees(args.baseline_src)]
        phases.append((f"ray:{args.cpus}{unit}", "this", REPO))
        runs = []
        for phase, tree, src in phases:
            res = measure(src, phase, data, data / f"out-{phase.replace(':', '')}-{tree}",
                          script)
            res.update(phase=phase, tree=tree, commit=commit(src))
            res["passages_per_s"] = round(res["rows"] / res["seconds"])
            runs.append(res)
            print(json.dumps(res))
    base = runs[0]
    same = all(r["corpus_sha"] == base["corpus_sha"] and r["rejected_sha"] ==
               base["rejected_sha"] for r in runs)
    print(f"\n--format {args.format}: {args.passages:,} passages ({mb} MB), {args.dups} "
          f"duplicate ids, {args.bad} bad "
          f"rows; shard_rows {SHARD_ROWS}; commit {commit(REPO)}\n")
    print("| run | commit | wall s | passages/s | vs first | driver peak MB | "
          "largest worker MB | rejected |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['phase']} | {r['commit']} | {r['seconds']} | {r['passages_per_s']:,} | "
              f"{base['seconds'] / r['seconds']:.2f}x | {r['driver_peak_rss_mb']} | "
              f"{r['actor_peak_rss_mb'] or '-'} | {r['rejected']} |")
    print(f"\nidentical corpus and rejected rows in every run: {same}")
    save(args.out, {"commit": commit(REPO), "format": args.format, "passages": args.passages,
                    "collection_mb": mb,
                    "unit_bytes": args.unit_bytes,
                    "dups": args.dups, "bad": args.bad, "cpus": args.cpus,
                    "shard_rows": SHARD_ROWS, "identical": same, "runs": runs})
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
