"""R@2kt / R@5kt tokens: NLTK's word_tokenize (XOR-TyDi's script, qgscale's metric) vs
cheaper stand-ins.

XOR-TyDi's ``eval_xor_retrieve.py`` tokenises each retrieved passage with NLTK's
``word_tokenize``, keeps the first 2,000 / 5,000 tokens, joins them with spaces and tests
``answer in joined``. ``word_tokenize`` = Punkt sentence splitting with NLTK's English model +
NLTK's Treebank-style word tokenizer per sentence (``NLTKWordTokenizer``). Tokenisations:

- ``nltk``: exactly ``word_tokenize`` (:func:`qgscale.eval.wordtok.word_tokenize`, the
  bundled punkt_tab parameters): what qgscale's metric uses;
- ``nltk_line``: ``NLTKWordTokenizer`` on the whole passage (no sentence split, no data;
  ``word_tokenize(text, preserve_line=True)``): only sentence-final periods inside a passage
  differ (``left.`` vs ``left .``);
- ``nltk_sent``: the same after splitting at every ``[.!?]`` + space + capital/digit/quote
  (a naive sentence splitter, no abbreviation rules);
- ``whitespace``: ``str.split`` (qgscale's tokens before the exact one).

Measured on (1) 300 real DPR ``psgs_w100`` passages (tokens per 100-word passage),
(2) XQuAD English: the 1,190 questions ranked over the 240 paragraphs with qgscale's BM25,
R@2kt / R@5kt with each tokenisation and how often the passage where the token cut falls
differs, (3) XOR-TyDi dev answers (optional file): queries none of whose answers can ever
match the re-joined tokens (e.g. ``"Maharashtra, India"`` becomes ``Maharashtra , India``).

    pip install -c constraints.txt nltk   # a dependency of qgscale; no data download
    python benchmarks/rkt_tokens.py --xor-dev xor_dev_retrieve_eng_span_v1_1.jsonl \\
        --out benchmarks/results/rkt_tokens.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

import nltk
from nltk.tokenize import NLTKWordTokenizer

from qgscale.data import readers
from qgscale.eval import wordtok
from qgscale.eval.metrics import YES_NO
from qgscale.retrieval import bm25

REPO = Path(__file__).resolve().parents[1]
PSGS = REPO / "tests" / "data" / "xor-tydi" / "psgs_w100.sample.tsv"
_WORDS = NLTKWordTokenizer()
_SENT = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def nltk_line(text: str) -> list[str]:
    return _WORDS.tokenize(text)


def nltk_sent(text: str) -> list[str]:
    return [t for s in _SENT.split(text) for t in _WORDS.tokenize(s)]


TOKENIZERS = {"nltk": wordtok.word_tokenize, "nltk_line": nltk_line, "nltk_sent": nltk_sent,
              "whitespace": str.split}


def cut(texts: list[str], tokenize, max_tokens: int) -> tuple[int, str]:
    """(index of the passage holding the last kept token, joined kept tokens) -- the
    official script's loop."""
    tokens: list[str] = []
    last = len(texts) - 1
    for i, text in enumerate(texts):
        tokens.extend(tokenize(text))
        if len(tokens) >= max_tokens:
            last = i
            break
    return last, " ".join(tokens[:max_tokens])


def xquad_en() -> tuple[list[str], list[str], list[str], list[list[str]]]:
    with gzip.open(f"{readers.bundled('xquad')}/xquad.en.json.gz", "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    pids, texts, questions, answers = [], [], [], []
    for a, article in enumerate(data):
        for p, para in enumerate(article["paragraphs"]):
            pids.append(f"{a}-{p}")
            texts.append(para["context"])
            for qa in para["qas"]:
                questions.append(qa["question"])
                answers.append([x["text"] for x in qa["answers"]])
    return pids, texts, questions, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--xor-dev", help="XOR-TyDi xor_dev_retrieve_eng_span_v1_1.jsonl")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/rkt_tokens.json")
    args = ap.parse_args()
    out: dict = {"nltk": nltk.__version__, "tokenizers": {
        "nltk": "nltk.word_tokenize exactly (bundled punkt_tab english; qgscale's metric)",
        "nltk_line": "NLTKWordTokenizer, whole passage (word_tokenize, preserve_line=True)",
        "nltk_sent": "NLTKWordTokenizer after a naive [.!?] sentence split",
        "whitespace": "str.split"}}

    # (1) real 100-word passages
    psgs = [r["text"] for r in readers.iter_passages(str(PSGS))]
    per = {n: statistics.mean(len(f(t)) for t in psgs) for n, f in TOKENIZERS.items()}
    out["psgs_w100_sample"] = {
        "passages": len(psgs), "tokens_per_passage": {n: round(v, 2) for n, v in per.items()},
        "ratio_to_whitespace": {n: round(v / per["whitespace"], 4) for n, v in per.items()},
        "passages_whose_tokens_differ_from_nltk": {
            n: sum(f(t) != wordtok.word_tokenize(t) for t in psgs) for n, f in TOKENIZERS.items()},
        "passages_in_2000_tokens": {n: round(2000 / v, 2) for n, v in per.items()}}

    # (2) XQuAD en, BM25 top-k over its paragraphs
    pids, texts, questions, answers = xquad_en()
    ranked, _ = bm25.search(texts, pids, questions, args.top_k)
    text_of = dict(zip(pids, texts, strict=True))
    res: dict = {"queries": len(questions), "passages": len(pids), "top_k": args.top_k}
    for max_tokens in (2000, 5000):
        key = f"{max_tokens // 1000}kt"
        cuts = {n: [cut([text_of[p] for p in r], f, max_tokens) for r in ranked]
                for n, f in TOKENIZERS.items()}
        hits = {n: [any(a in joined for a in ans if a not in YES_NO)
                    for (_, joined), ans in zip(c, answers, strict=True)]
                for n, c in cuts.items()}
        res.setdefault("recall", {})[f"r@{key}"] = {
            n: round(statistics.mean(h), 4) for n, h in hits.items()}
        res.setdefault("passages_in_window_mean", {})[key] = {
            n: round(statistics.mean(i + 1 for i, _ in c), 2) for n, c in cuts.items()}
        exact = cuts["nltk"]
        for n in ("nltk_line", "nltk_sent", "whitespace"):
            shift = [x[0] - e[0] for e, x in zip(exact, cuts[n], strict=True)]
            res.setdefault("vs_nltk", {}).setdefault(n, {})[key] = {
                "cut_in_other_passage": round(statistics.mean(s != 0 for s in shift), 4),
                "mean_passages_later": round(statistics.mean(shift), 3),
                "hit_differs": round(statistics.mean(
                    a != b for a, b in zip(hits["nltk"], hits[n], strict=True)), 4)}
    res["no_answer_survives_tokenisation"] = {
        n: round(statistics.mean(all(" ".join(f(a)) != a for a in ans) for ans in answers), 4)
        for n, f in (("whitespace", str.split), ("nltk", wordtok.word_tokenize))}
    out["xquad_en_bm25"] = res

    # (3) answers that can never match the re-joined tokens
    if args.xor_dev:
        rows = [json.loads(x) for x in open(args.xor_dev, encoding="utf-8") if x.strip()]
        spans = [[a for a in r["answers"] if a not in YES_NO] for r in rows]
        spans = [s for s in spans if s]
        never = {n: sum(all(" ".join(f(a)) != a for a in s) for s in spans)
                 for n, f in (("whitespace", str.split), ("nltk", wordtok.word_tokenize))}
        out["xor_dev_answers"] = {
            "file": Path(args.xor_dev).name, "queries_with_span_answers": len(spans),
            "no_answer_survives_tokenisation": never,
            "fraction": {n: round(v / len(spans), 4) for n, v in never.items()}}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
