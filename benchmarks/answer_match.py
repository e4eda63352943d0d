"""Precision of BM25 + answer-match positives on XQuAD, where the gold paragraph is known.

For each language: the 1,190 questions are ranked over that language's 240 paragraphs with
qgscale's BM25 (one index per language; passage = "title text"); each question's top-k are
split by DPR's answer match (``qgscale.retrieval.answers``, the question's gold answer,
matched in the paragraph text without its title) into positives and hard negatives, as
:func:`answer_match_examples` builds training data. Reported per language, match mode and k:

- ``precision``: the fraction of positives that are the gold paragraph;
- ``precision_first``: the same for the highest-ranked positive only (one positive per query,
  DPR-style training);
- ``coverage``: queries with at least one positive (the others get no training example);
- ``gold_positive``: queries whose gold paragraph is among their positives;
- ``gold_negative``: queries whose gold paragraph is in the top k but not matched (a false
  negative: it becomes a hard negative of the query, or the query gets no example);
- ``bm25_recall``: queries whose gold paragraph is in the top k.

    python benchmarks/answer_match.py --out benchmarks/results/answer_match_xquad.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from qgscale.data import readers
from qgscale.data.schema import passage_text
from qgscale.retrieval import bm25
from qgscale.retrieval.answers import MATCHES, answer_match_examples


def language(lang: str, ks: list[int]) -> dict:
    t = readers.read_xquad(readers.bundled("xquad"), [lang], [lang])
    corpus = t["train/corpus"] + t["test/corpus"]
    queries = t["train/queries"] + t["test/queries"]
    gold = {r["qid"]: r["pid"] for r in t["train/qrels"] + t["test/qrels"]}
    with gzip.open(f"{readers.bundled('xquad')}/xquad.{lang}.json.gz", "rt",
                   encoding="utf-8") as f:
        answers = {f"{lang}:{qa['id']}": [a["text"] for a in qa["answers"]]
                   for article in json.load(f)["data"] for para in article["paragraphs"]
                   for qa in para["qas"]}
    pids = [p["pid"] for p in corpus]
    ranked, _ = bm25.search([passage_text(p["title"], p["text"]) for p in corpus], pids,
                            [q["text"] for q in queries], max(ks))
    ranked = {q["qid"]: r for q, r in zip(queries, ranked, strict=True)}
    texts = {p["pid"]: p["text"] for p in corpus}
    qids = [q["qid"] for q in queries]
    out: dict = {"queries": len(qids), "passages": len(pids)}
    for k in ks:
        top = {q: r[:k] for q, r in ranked.items()}
        res = {"bm25_recall": round(statistics.mean(gold[q] in top[q] for q in qids), 4)}
        for match in MATCHES:
            rows = answer_match_examples(qids, answers, top, texts, n_neg=k, match=match)
            pos = [p for r in rows for p in r["pos_pids"]]
            matched = {r["qid"]: set(r["pos_pids"]) for r in rows}
            hits = sum(p == gold[r["qid"]] for r in rows for p in r["pos_pids"])
            res[match] = {
                "positives": len(pos),
                "precision": round(hits / len(pos), 4) if pos else None,
                "precision_first": round(statistics.mean(
                    r["pos_pids"][0] == gold[r["qid"]] for r in rows), 4) if rows else None,
                "coverage": round(len(rows) / len(qids), 4),
                "gold_positive": round(sum(gold[r["qid"]] in r["pos_pids"] for r in rows)
                                       / len(qids), 4),
                "gold_negative": round(statistics.mean(
                    gold[q] in top[q] and gold[q] not in matched.get(q, ()) for q in qids), 4),
            }
        out[f"top{k}"] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", default="20,100", help="comma-separated top-k cut-offs")
    ap.add_argument("--langs", default=",".join(readers.XQUAD_LANGS))
    ap.add_argument("--out", default="benchmarks/results/answer_match_xquad.json")
    args = ap.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    t0 = time.time()
    langs = {lang: language(lang, ks) for lang in args.langs.split(",")}
    summary = {f"top{k}": {m: {key: round(statistics.mean(v[f"top{k}"][m][key]
                                                          for v in langs.values()), 4)
                               for key in ("precision", "precision_first", "coverage")}
                           for m in MATCHES} for k in ks}
    out = {"data": "XQuAD (bundled), 12 languages, monolingual: 1,190 questions x 240 "
                   "paragraphs per language", "bm25": {"k1": bm25.K1, "b": bm25.B,
                                                      "tokenizer": bm25.TOKENIZER},
           "macro_over_languages": summary, "languages": langs,
           "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'lang':5} " + " ".join(f"{m}@{k:<3} prec  first  cover" for k in ks
                                    for m in MATCHES))
    for lang, v in langs.items():
        print(f"{lang:5} " + " ".join(
            f"{'':>10} {v[f'top{k}'][m]['precision'] or 0:.3f} "
            f"{v[f'top{k}'][m]['precision_first'] or 0:.3f} {v[f'top{k}'][m]['coverage']:.3f}"
            for k in ks for m in MATCHES))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
