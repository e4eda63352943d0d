"""Precision of the ``bm25`` stage's answer-match positives on XQuAD, where the gold paragraph
is known.

Each language runs through the pipeline itself (``configs/xor-tydi.yaml`` with ``--set``
overrides, local Ray): its 1,190 questions with their gold answers are written in
XOR-TyDi's JSONL format and its 240 paragraphs as a passage JSONL, stage ``prepare`` reads
them (3 corpus shards), then stage ``bm25`` (BM25 over the shards with global statistics,
DPR's answer match, :func:`qgscale.retrieval.sharded.run_bm25_train`) writes its training
examples once per setting (``bm25.top_k``, ``bm25.train_query``, ``bm25.match``; the other
``bm25`` fields at the config's defaults). Monolingual: a language's questions over its own
paragraphs. Reported per language and setting, from the stage's examples:

- ``precision``: the fraction of positives that are the gold paragraph;
- ``precision_first``: the same for each query's first (highest-ranked) positive;
- ``coverage``: queries with at least one positive (the others get no training example);
- ``gold_positive``: queries whose gold paragraph is among their positives;
- ``gold_hard_negative``: queries whose gold paragraph is among their ``bm25.n_negatives``
  hard negatives (retrieved, but its text does not match the answer: a false negative).

``dpr-chars`` differs from ``dpr`` only for text without spaces between words (here th, zh);
it is run for those languages only (``--chars-langs``).

    python benchmarks/answer_match.py --out benchmarks/results/answer_match_xquad.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from qgscale import config, pipeline, storage
from qgscale.data import readers
from qgscale.layout import Layout
from qgscale.retrieval import bm25

REPO = Path(__file__).resolve().parents[1]


def write_inputs(lang: str, folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """XQuAD ``lang`` as XOR-TyDi query JSONL + passage JSONL; returns the gold pid per qid."""
    with gzip.open(f"{readers.bundled('xquad')}/xquad.{lang}.json.gz", "rt",
                   encoding="utf-8") as f:
        data = json.load(f)["data"]
    gold: dict[str, str] = {}
    queries, passages = folder / f"xquad-{lang}.jsonl", folder / f"xquad-{lang}-psgs.jsonl"
    with open(queries, "w", encoding="utf-8") as q, open(passages, "w", encoding="utf-8") as p:
        for a, article in enumerate(data):
            for i, para in enumerate(article["paragraphs"]):
                pid = f"{lang}:{a}-{i}"
                p.write(json.dumps({"id": pid, "lang": lang, "title": article["title"],
                                    "text": para["context"]}, ensure_ascii=False) + "\n")
                for qa in para["qas"]:
                    qid = f"{lang}:{qa['id']}"
                    gold[qid] = pid
                    q.write(json.dumps({"id": qid, "lang": lang, "question": qa["question"],
                                        "answers": [x["text"] for x in qa["answers"]],
                                        "split": "train"}, ensure_ascii=False) + "\n")
    return queries, passages, gold


def overrides(root: Path, queries: Path, passages: Path, num_cpus: int, lang: str
              ) -> list[str]:
    return [f"run.root={root}", "ray.address=null", f"ray.num_cpus={num_cpus}",
            f"data.input={queries}", f"data.passages={passages}", "data.shard_rows=80",
            f"data.query_langs=[{lang}]",
            "bm25.num_actors=1", "eval.data=null"]


def measure(examples: list[dict], gold: dict[str, str]) -> dict:
    pos = [p for r in examples for p in r["pos_pids"]]
    hits = sum(p == gold[r["qid"]] for r in examples for p in r["pos_pids"])
    n = len(gold)
    return {
        "examples": len(examples), "positives": len(pos),
        "precision": round(hits / len(pos), 4) if pos else None,
        "precision_first": round(statistics.mean(
            r["pos_pids"][0] == gold[r["qid"]] for r in examples), 4) if examples else None,
        "coverage": round(len(examples) / n, 4),
        "gold_positive": round(sum(gold[r["qid"]] in r["pos_pids"] for r in examples) / n, 4),
        "gold_hard_negative": round(sum(gold[r["qid"]] in r["neg_pids"] for r in examples)
                                    / n, 4)}


def language(lang: str, settings: list[tuple[int, str, str]], work: Path, num_cpus: int) -> dict:
    folder = work / lang
    folder.mkdir(parents=True)
    queries, passages, gold = write_inputs(lang, folder)
    base = overrides(folder / "run", queries, passages, num_cpus, lang)
    yaml = REPO / "configs" / "xor-tydi.yaml"
    pipeline.run(config.load(yaml, base), only="prepare")
    out: dict = {"queries": len(gold), "passages": len(set(gold.values()))}
    for k, query, match in settings:
        cfg = config.load(yaml, [*base, f"bm25.top_k={k}", f"bm25.train_query={query}",
                                 f"bm25.match={match}"])
        t0 = time.time()
        summary = pipeline.run(cfg, only="bm25")["bm25"]
        lay = Layout(cfg)
        examples = storage.read_parquet(storage.join(lay.bm25_train, "examples")).to_pylist()
        assert summary["examples"] == len(examples) and summary["queries"] == len(gold)
        row = measure(examples, gold)
        row["stage_s"] = round(time.time() - t0, 1)
        out.setdefault(f"top{k}", {}).setdefault(query, {})[match] = row
        print(f"{lang} top{k} {query:16} {match:9} " + " ".join(
            f"{key}={row[key]}" for key in ("precision", "precision_first", "coverage",
                                            "gold_hard_negative")), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="20,100", help="bm25.top_k values")
    ap.add_argument("--train-query", default="question+answers,question")
    ap.add_argument("--langs", default=",".join(readers.XQUAD_LANGS))
    ap.add_argument("--chars-langs", default="th,zh", help="languages also run with dpr-chars")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/answer_match_xquad.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ks = [int(x) for x in args.k.split(",")]
    modes = args.train_query.split(",")
    chars = set(args.chars_langs.split(",")) if args.chars_langs else set()
    t0 = time.time()
    langs = {}
    with tempfile.TemporaryDirectory(prefix="qgscale-answer-match-") as work:
        for lang in args.langs.split(","):
            matches = ["dpr", "dpr-chars"] if lang in chars else ["dpr"]
            settings = [(k, q, m) for k in ks for q in modes for m in matches]
            langs[lang] = language(lang, settings, Path(work), args.num_cpus)
    macro = {f"top{k}": {q: {key: round(statistics.mean(
        v[f"top{k}"][q]["dpr"][key] for v in langs.values()), 4)
        for key in ("precision", "precision_first", "coverage", "gold_hard_negative")}
        for q in modes} for k in ks}
    cfg = config.load(REPO / "configs" / "xor-tydi.yaml", [])
    out = {"data": "XQuAD (bundled), monolingual: each language's 1,190 questions (gold answers) "
                   "over its 240 paragraphs, 3 corpus shards",
           "stages": "configs/xor-tydi.yaml, stages prepare + bm25 (local Ray)",
           "bm25": {"k1": cfg.bm25.k1, "b": cfg.bm25.b, "n_negatives": cfg.bm25.n_negatives,
                    "n_positives": cfg.bm25.n_positives, "tokenizer": bm25.TOKENIZER},
           "macro_over_languages_dpr": macro, "languages": langs,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(macro, indent=1))


if __name__ == "__main__":
    main()
