"""A search actor's passage languages (``ShardSearcher.lang_ids``, for eval's per-language
searches of a multilingual corpus): from its own id map files, against the scan of the whole
corpus's ``pid, lang`` columns that every actor ran before the id map carried ``lang`` (the
path an index built from embeddings without ``lang`` still takes; its code is unchanged).

    python benchmarks/lang_ids.py --out benchmarks/results/lang_ids.json \
        [--passages 2000000 --corpus-shards 40 --index-shards 8]

Data (synthetic, written once): ``--passages`` passages in ``--corpus-shards`` corpus files
(12 languages at random), their 8-d embeddings twice (with and without ``lang``), and a Flat
index of ``--index-shards`` shards built from each (``qgscale.index.build``, local Ray of 2
CPUs). Per way, a child process opens index shard 0's ``ShardSearcher`` as a search actor
does (``start_*``: its index shard and pids) and calls ``lang_ids()``, each timed, counting
the parquet files and Arrow bytes read; both ways must give the same ids. Peak RSS and CPU
seconds of the child come from outside (``before_after.measure``). Prints a table; writes
JSON. At 1B passages in 288 index shards the scan is 288 reads of the corpus's two columns
(~1B rows each); the id map's is each actor's own ~3.5M ids and languages.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import REPO, commit, measure, parse, parser, save  # noqa: E402

LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
WAYS = ("corpus_scan", "id_map")


def write_data(root: Path, n: int, corpus_shards: int, index_shards: int) -> None:
    """``root/corpus``, ``root/emb-{lang,plain}`` and ``root/index-{id_map,corpus_scan}``."""
    import pyarrow as pa
    import ray

    from qgscale import storage
    from qgscale.config import BuildConfig
    from qgscale.data.schema import CORPUS
    from qgscale.index.build import build_index
    from qgscale.index.encode import embeddings_table

    rng = np.random.default_rng(0)
    bounds = np.linspace(0, n, corpus_shards + 1).astype(int)
    for s in range(corpus_shards):
        a, b = int(bounds[s]), int(bounds[s + 1])
        pids = [f"p{i}" for i in range(a, b)]
        langs = [LANGS[i] for i in rng.integers(0, len(LANGS), b - a)]
        vecs = rng.normal(size=(b - a, 8)).astype(np.float32)
        name = f"part-{s:05d}.parquet"
        storage.write_parquet(str(root / "corpus" / name), pa.table(
            {"pid": pids, "lang": langs, "title": [""] * len(pids),
             "text": ["x"] * len(pids)}, schema=CORPUS))
        storage.write_parquet(str(root / "emb-lang" / name),
                              embeddings_table(pids, vecs, langs=langs))
        storage.write_parquet(str(root / "emb-plain" / name), embeddings_table(pids, vecs))
    started = not ray.is_initialized()  # a test's Ray is used as it is
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for way, emb in (("id_map", "emb-lang"), ("corpus_scan", "emb-plain")):
            build_index(str(root / emb), str(root / f"index-{way}"),
                        BuildConfig(factory="Flat", num_shards=index_shards,
                                    cpus_per_actor=1 if started else 0.5))
    finally:
        if started:
            ray.shutdown()


def child(way: str, data: str, out: str) -> None:
    """One search actor's ``lang_ids()`` of index shard 0, the reads it made counted."""
    from qgscale import storage
    from qgscale.index import search as S

    index = f"{data}/index-{way}"
    rel = storage.read_manifest(index)["shards"][0]
    reads = {"files": 0, "bytes": 0}
    read, read_columns = storage.read_parquet, storage.read_columns

    def counted(t):
        reads["files"] += 1
        reads["bytes"] += t.nbytes if t is not None else 0
        return t

    storage.read_parquet = lambda uri, columns=None: counted(read(uri, columns))
    storage.read_columns = lambda uri, columns: counted(read_columns(uri, columns))
    try:
        t0 = time.perf_counter()  # the actor's start: its index shard and id map files
        actor = S.ShardSearcher(index, rel, False, None, None, corpus_uri=f"{data}/corpus")
        start_s, start = time.perf_counter() - t0, dict(reads)
        reads.update(files=0, bytes=0)
        t0 = time.perf_counter()
        got = actor.lang_ids()
        seconds = time.perf_counter() - t0
    finally:
        storage.read_parquet, storage.read_columns = read, read_columns
    digest = {k: [int(v.size), int(v.sum())] for k, v in sorted(got.items())}
    mb = 1 << 20
    print(json.dumps({"start_s": round(start_s, 3), "start_files": start["files"],
                      "start_arrow_mb": round(start["bytes"] / mb, 1),
                      "lang_ids_s": round(seconds, 3), "files_read": reads["files"],
                      "arrow_mb_read": round(reads["bytes"] / mb, 1),
                      "shard_ids": int(actor.pid_map.ids.size), "langs": digest}))


def main() -> None:
    ap = parser(__doc__, "lang_ids.json")
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--corpus-shards", type=int, default=40)
    ap.add_argument("--index-shards", type=int, default=8)
    ap.add_argument("--data", default=None, help="reuse/keep the data here")
    args = parse(ap, child)
    root = Path(args.data or tempfile.mkdtemp(prefix="qgs-lang-ids-"))
    if not (root / "index-corpus_scan" / "_manifest.json").exists():
        t0 = time.time()
        write_data(root, args.passages, args.corpus_shards, args.index_shards)
        print(f"data written in {time.time() - t0:.0f} s: {root}")
    rows = {way: measure(REPO, way, root, root, __file__) for way in WAYS}
    if rows["id_map"].pop("langs") != rows["corpus_scan"].pop("langs"):
        raise SystemExit("the two ways gave different language ids")
    print(f"\n{'way':<12} {'start s':>8} {'MB':>6} {'lang_ids s':>10} {'files':>6} "
          f"{'MB read':>8} {'ids':>8} {'peak RSS MB':>11} {'CPU s':>6}")
    for way, r in rows.items():
        print(f"{way:<12} {r['start_s']:>8} {r['start_arrow_mb']:>6} {r['lang_ids_s']:>10} "
              f"{r['files_read']:>6} {r['arrow_mb_read']:>8} {r['shard_ids']:>8} "
              f"{r['driver_peak_rss_mb']:>11} {r['driver_cpu_s']:>6}")
    ratio = rows["corpus_scan"]["lang_ids_s"] / max(rows["id_map"]["lang_ids_s"], 1e-9)
    print(f"speed-up of lang_ids: {ratio:.1f}x")
    save(args.out, {"commit": commit(REPO), "passages": args.passages,
                    "corpus_shards": args.corpus_shards, "index_shards": args.index_shards,
                    "ways": rows, "lang_ids_speedup": round(ratio, 2), "same_ids": True})


if __name__ == "__main__":
    main()
