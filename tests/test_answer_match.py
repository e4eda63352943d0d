"""DPR's answer match (has_answer) and answer-match training examples; R@kt tokens."""

from __future__ import annotations

import gzip
import json

import pytest

from qgscale.eval import metrics as M
from qgscale.retrieval.answers import answer_match_examples, dpr_tokens, has_answer

from .conftest import TEST_DATA


def test_dpr_tokens_and_match_rules():
    # SimpleTokenizer: alphanumeric runs and single other characters, lower-cased
    assert dpr_tokens("U.S. Route 66, (1926–1985)!") == (
        "u", ".", "s", ".", "route", "66", ",", "(", "1926", "–", "1985", ")", "!")
    assert has_answer(["July 5, 2018"], "released on July 5 , 2018 in Japan")  # tokens
    assert has_answer(["linda davis"], "by Reba McEntire and Linda Davis.")  # uncased
    assert not has_answer(["Dav"], "Linda Davis")  # whole tokens only
    # no article or punctuation stripping (that is DPR's reader EM, not has_answer)
    assert not has_answer(["the Saint Lawrence River"], "into Saint Lawrence River")
    assert not has_answer(["Lawrence River."], "the Lawrence River flows")
    assert has_answer(["café"], "Un cafe\u0301 noir")  # NFD on both sides
    assert not has_answer(["yes", "No", "  "], "yes no")  # boolean and blank answers ignored
    # text without spaces: DPR's tokens are whole clauses; dpr-chars matches inside them
    assert dpr_tokens("東京タワーは高い。") == ("東京タワーは高い", "。")
    assert not has_answer(["東京"], "東京タワーは高い。")
    assert has_answer(["東京"], "東京タワーは高い。", match="dpr-chars")
    assert has_answer(["ทย"], "ภาษาไทย", match="dpr-chars")
    assert not has_answer(["Dav"], "Linda Davis", match="dpr-chars")  # Latin: as dpr
    # digits and Latin words inside such a token stay whole: dates, numbers, names match
    text = "iPhoneは2007年にAppleが発表した。"
    assert dpr_tokens(text, "dpr-chars")[:6] == ("iphone", "は", "2007", "年", "に", "apple")
    for answer in ("iPhone", "2007", "Apple", "2007年"):
        assert has_answer([answer], text, match="dpr-chars"), answer
    assert not has_answer(["200"], text, match="dpr-chars")  # a whole run, not a substring
    with pytest.raises(ValueError, match="unknown match"):
        dpr_tokens("x", "substring")


def test_dpr_sample_agrees_with_dpr_own_labels():
    """DPR built its NQ data with has_answer: its BM25 positives contain the answer and its
    hard negatives (BM25 passages) do not -- all but one, '(1987–2002)', where the en dash
    makes '2002' a token by the SimpleTokenizer definition."""
    raw = json.loads(gzip.decompress((TEST_DATA / "dpr" / "sample.json.gz").read_bytes()))
    bm25_pos = [(r["answers"], c) for r in raw for c in r["positive_ctxs"] if c["score"] < 1000]
    assert len(bm25_pos) == 17 and all(has_answer(a, c["text"]) for a, c in bm25_pos)
    hard = [(r["answers"], c) for r in raw for c in r["hard_negative_ctxs"]]
    matched = [c for a, c in hard if has_answer(a, c["text"])]
    assert len(hard) == 483 and [c["passage_id"] for c in matched] == ["12006127"]
    assert "Eli (1987–2002)" in matched[0]["text"]


def test_answer_match_examples():
    texts = {"p1": "Paris is big.", "p2": "Lyon.", "p3": "The capital, Paris.", "p4": "Nice.",
             "p5": "Rome."}
    retrieved = {"q1": ["p2", "p1", "p4", "p3", "p5"], "q2": ["p2", "p4"], "q3": ["p1"],
                 "q4": ["p9"]}
    answers = {"q1": ["paris"], "q2": ["Paris"], "q3": ["yes"], "q4": ["x"]}
    rows = answer_match_examples(["q1", "q2", "q3"], answers, retrieved, texts, n_neg=2)
    assert rows == [{"qid": "q1", "pos_pids": ["p1", "p3"], "neg_pids": ["p2", "p4"]}]
    rows = answer_match_examples(["q1"], answers, retrieved, texts, n_neg=1, n_pos=1)
    assert rows == [{"qid": "q1", "pos_pids": ["p1"], "neg_pids": ["p2"]}]
    with pytest.raises(KeyError, match="no text for retrieved passage 'p9'"):
        answer_match_examples(["q4"], answers, retrieved, texts, n_neg=1)


def test_answer_recall_with_another_tokenizer():
    """R@kt tokens: NLTK's word_tokenize by default (punctuation split off, so an answer with
    a comma can no longer match the joined tokens, and more tokens mean an earlier cut);
    whitespace tokens or any other tokenizer on request."""
    def split_punct(text: str) -> list[str]:
        return text.replace(",", " ,").replace(".", " .").split()

    texts = ["Portland, Oregon is a city.", "x " * 10]
    assert M.answer_hit(texts, ["Portland, Oregon"], 2000, tokenize=str.split)
    assert not M.answer_hit(texts, ["Portland, Oregon"], 2000)  # NLTK: "Portland , Oregon"
    assert not M.answer_hit(texts, ["Portland, Oregon"], 2000, tokenize=split_punct)
    assert M.answer_hit(texts, ["city"], 5, tokenize=str.split)
    assert not M.answer_hit(texts, ["city"], 5) and not M.answer_hit(texts, ["city"], 5,
                                                                      tokenize=split_punct)
    assert M.answer_hit(texts, ["city"], 6)  # Portland , Oregon is a city
    rows = M.answer_recall_per_query({"q": {"a": 1.0}}, {"a": texts[0]}, {"q": ["city"]},
                                     max_tokens=(5,), tokenize=split_punct)
    assert rows == {"q": {"r@0kt": 0.0}}
