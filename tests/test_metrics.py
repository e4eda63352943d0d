"""Retrieval metrics: hand-computed values and a cross-check against ranx on the same runs."""

from __future__ import annotations

import math
import random

import pytest

from qgscale.eval import metrics as M

QRELS = {"q1": {"a": 1, "c": 1}, "q2": {"x": 2, "y": 1}, "q3": {"m": 1}, "q4": {"p": 1},
         "q5": {"zz": 0}}
RUN = {"q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.1},
       "q2": {"y": 3.0, "z": 2.0, "x": 1.0},
       "q3": {"n": 1.0, "o": 0.5}}  # q4 not retrieved at all; q5 has no relevant passage


def test_per_query_hand_computed():
    rows = M.per_query(RUN, QRELS, ["recall@1", "recall@3", "mrr@10", "ndcg@10", "map"])
    assert set(rows) == {"q1", "q2", "q3", "q4"}  # q5: nothing relevant -> not evaluated
    q1, q2 = rows["q1"], rows["q2"]
    assert q1["recall@1"] == 0.5 and q1["recall@3"] == 1.0 and q1["mrr@10"] == 1.0
    assert q1["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert q1["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    # graded: x (rel 2) at rank 3, y (rel 1) at rank 1
    assert q2["ndcg@10"] == pytest.approx((1 + 2 / 2) / (2 + 1 / math.log2(3)))
    assert q2["mrr@10"] == 1.0 and q2["recall@1"] == 0.5
    assert rows["q3"] == rows["q4"] == {"recall@1": 0.0, "recall@3": 0.0, "mrr@10": 0.0,
                                         "ndcg@10": 0.0, "map": 0.0}
    mean = M.evaluate(RUN, QRELS, ["recall@3", "mrr@10"])
    assert mean == {"recall@3": 2 / 4, "mrr@10": 0.5, "n": 4}


def test_cutoffs_and_ties():
    run = {"q": {f"p{i}": 1.0 - i / 100 for i in range(20)}}
    qrels = {"q": {"p12": 1}}
    r = M.evaluate(run, qrels, ["mrr@10", "recall@10", "recall@20", "ndcg@10"])
    assert r["mrr@10"] == 0 and r["recall@10"] == 0 and r["recall@20"] == 1
    assert M.ranking({"b": 1.0, "a": 1.0, "c": 2.0}) == ["c", "a", "b"]
    with pytest.raises(ValueError, match="unknown metric"):
        M.evaluate(run, qrels, ["precision@3"])


def _random_case(seed: int, n_q: int = 40, n_p: int = 60):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(n_q):
        qid = f"q{q}"
        rel = rng.sample(range(n_p), rng.randint(1, 4))
        qrels[qid] = {f"p{p}": rng.choice([1, 1, 2, 3]) for p in rel}
        ret = rng.sample(range(n_p), rng.randint(5, 30))
        run[qid] = {f"p{p}": rng.random() for p in ret}  # distinct floats: no ties
    return qrels, run


@pytest.fixture(scope="module")
def ranx():
    """ranx, its numba kernels run as plain Python: the same code, without the ~60 s of JIT
    compilation it cost the suite for 40 queries. numba reads the switch when ranx decorates
    its kernels (at import) and when ranx builds its typed lists, so it stays set."""
    numba = pytest.importorskip("numba")
    numba.config.DISABLE_JIT = True
    return pytest.importorskip("ranx")


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_ranx(seed, ranx):
    qrels, run = _random_case(seed)
    names = ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10", "map"]
    ours = M.evaluate(run, qrels, names)
    theirs = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), names)
    assert ours["n"] == len(qrels)
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name
    assert 0 < ours["mrr@10"] < 1  # the case is not degenerate


def test_answer_recall_token_window():
    # the answer starts at token 2000 (0-based) -> outside R@2kt, inside R@5kt
    filler = " ".join(["w"] * 1000)
    passages = {"p1": filler, "p2": filler + "  Mount\tEverest rises", "p3": "Mount Everest"}
    run = {"q1": {"p1": 3.0, "p2": 2.0, "p3": 1.0},
           "q2": {"p3": 3.0, "p1": 1.0},
           "q3": {"p1": 1.0},
           "q4": {"p3": 1.0}}
    answers = {"q1": ["Mount Everest"], "q2": ["mount everest", "Mount Everest"],
               "q3": ["yes"], "q4": ["Everest", "no"]}
    rows = M.answer_recall_per_query(run, passages, answers)
    assert rows["q1"] == {"r@2kt": 0.0, "r@5kt": 1.0}  # whitespace collapsed when joined
    assert rows["q2"] == {"r@2kt": 1.0, "r@5kt": 1.0}  # case-sensitive; any answer hits
    assert "q3" not in rows  # yes/no only: not counted, as in eval_xor_retrieve.py
    assert rows["q4"] == {"r@2kt": 1.0, "r@5kt": 1.0}
    assert M.answer_hit(["Mount Ever", "est"], ["Mount Everest"], 2000) is False
    with pytest.raises(KeyError, match="no text for retrieved passage"):
        M.answer_recall_per_query({"q1": {"p9": 1.0}}, passages, answers)
    assert M.answer_hit(["a b c"], ["b c"], 2) is False and M.answer_hit(["a b c"], ["b"], 2)


def test_rkt_tokens_are_nltk_word_tokenize(tmp_path, monkeypatch):
    """The metric's tokens are nltk.word_tokenize's, Punkt sentence split included: checked
    against NLTK itself loading the same punkt_tab files from an nltk_data folder."""
    import shutil

    import nltk

    from qgscale.data import readers
    from qgscale.eval import wordtok
    from tests.conftest import TEST_DATA

    shutil.copytree(wordtok.punkt_dir(), tmp_path / "tokenizers" / "punkt_tab" / "english")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    try:
        texts = [r["title"] + " " + r["text"] for r in readers.iter_passages(
            str(TEST_DATA / "pyserini" / "psgs_w100_pyserini_100.jsonl"))]
        texts.append('Mr. Smith paid $3.5m in Jan. 1999. He said "don\'t". It ended.')
        split = 0
        for text in texts:
            assert wordtok.word_tokenize(text) == nltk.word_tokenize(text)
            split += wordtok.word_tokenize(text) != wordtok.line_tokenize(text)
        assert split >= 10  # the sentence split changes the tokens of many passages
    finally:
        nltk.tokenize._get_punkt_tokenizer.cache_clear()
    assert wordtok.word_tokenize(texts[-1]) == [
        "Mr.", "Smith", "paid", "$", "3.5m", "in", "Jan.", "1999", ".", "He", "said", "``",
        "do", "n't", "''", ".", "It", "ended", "."]
    # punctuation split off: an answer with a comma never matches, as in the official script
    passages = {"p": "Pune is in Maharashtra, India. It grew."}
    rows = M.answer_recall_per_query({"q": {"p": 1.0}, "r": {"p": 1.0}}, passages,
                                     {"q": ["Maharashtra, India"], "r": ["India ."]})
    assert rows == {"q": {"r@2kt": 0.0, "r@5kt": 0.0}, "r": {"r@2kt": 1.0, "r@5kt": 1.0}}
    assert M.answer_hit(passages.values(), ["Maharashtra, India"], 10, str.split)


def test_evaluate_languages_pairs_and_macros():
    # parallel corpus: passage i in en/de; queries in en/de, relevant to passage i in both
    langs = ["en", "de"]
    qrels, qlang, plang = {}, {}, {}
    for ql in langs:
        for i in range(2):
            qid = f"{ql}:q{i}"
            qlang[qid] = ql
            qrels[qid] = {f"{cl}:p{i}": 1 for cl in langs}
    for cl in langs:
        for i in range(2):
            plang[f"{cl}:p{i}"] = cl

    def pair_run(ql, cl, right):  # `right` queries rank their own passage first
        run = {}
        for i in range(2):
            own, other = f"{cl}:p{i}", f"{cl}:p{1 - i}"
            good = i < right
            run[f"{ql}:q{i}"] = {own: 2.0 if good else 1.0, other: 1.0 if good else 2.0}
        return run

    pair_runs = {("en", "en"): pair_run("en", "en", 2), ("de", "de"): pair_run("de", "de", 2),
                 ("de", "en"): pair_run("de", "en", 1), ("en", "de"): pair_run("en", "de", 0)}
    pooled = {q: {**{p: s + 0.5 for p, s in pair_runs[(ql, "en")][q].items()},
                  **pair_runs[(ql, "de")][q]} for q, ql in qlang.items()}
    out = M.evaluate_languages(pair_runs, qrels, qlang, plang, pooled_run=pooled,
                               metrics=["recall@1", "mrr@10"])
    assert out["pairs"]["de->en"] == {"recall@1": 0.5, "mrr@10": 0.75, "n": 2}
    assert out["pairs"]["en->de"]["mrr@10"] == 0.5
    assert out["pairs"]["en->en"]["recall@1"] == 1.0
    assert out["macro"]["x->en"] == {"recall@1": 0.5, "mrr@10": 0.75, "groups": 1}
    assert out["macro"]["cross_lingual"]["mrr@10"] == pytest.approx((0.75 + 0.5) / 2)
    assert out["macro"]["monolingual"] == {"recall@1": 1.0, "mrr@10": 1.0, "groups": 2}
    # pooled (en passages first): both languages' passages are relevant -> recall@1 <= 1/2
    assert out["query_langs"]["en"]["recall@1"] == 0.5
    assert out["query_langs"]["de"]["recall@1"] == 0.25
    assert out["query_langs_macro"]["groups"] == 2
    # a block of queries at a time (one en query, then the rest): the same numbers
    acc = M.LanguageMetrics(["recall@1", "mrr@10"])
    for block in (["en:q0"], ["en:q1", "de:q0", "de:q1"]):
        acc.add({k: {q: r[q] for q in block if q in r} for k, r in pair_runs.items()}, qrels,
                {q: qlang[q] for q in block}, plang, {q: pooled[q] for q in block})
    assert acc.result() == out


def test_pair_view_of_one_corpus_language_is_the_pooled_view():
    # ja:2's only positive is not in the corpus (no language): a miss in the pair view too,
    # as in the pooled one, not a query dropped from it
    qrels = {"ja:1": {"en:a": 1}, "ja:2": {"en:gone": 1}}
    qlang = {"ja:1": "ja", "ja:2": "ja"}
    run = {"ja:1": {"en:a": 1.0, "en:b": 0.5}, "ja:2": {"en:a": 1.0, "en:b": 0.5}}
    out = M.evaluate_languages({("ja", "en"): run}, qrels, qlang, {"en:a": "en", "en:b": "en"},
                               pooled_run=run, metrics=["recall@1", "mrr@10"])
    assert out["pairs"]["ja->en"] == out["query_langs"]["ja"] == {
        "recall@1": 0.5, "mrr@10": 0.5, "n": 2}
    assert out["macro"]["x->en"]["mrr@10"] == out["query_langs_macro"]["mrr@10"] == 0.5


QLANG2 = {"ja:1": "ja", "ja:2": "ja"}
PLANG2 = {"en:a": "en", "de:a": "de"}
PAIR_RUNS2 = {("ja", "en"): {"ja:1": {"en:a": 1.0}, "ja:2": {"en:a": 1.0}},
              ("ja", "de"): {"ja:1": {"de:a": 1.0}, "ja:2": {"de:a": 1.0}}}


def test_pair_views_keep_positives_missing_from_the_corpus():
    # two corpus languages: en:gone (not in the corpus) stays in each pair's qrels, a miss
    qrels = {"ja:1": {"en:a": 1, "en:gone": 1}, "ja:2": {"de:a": 1}}
    out = M.evaluate_languages(PAIR_RUNS2, qrels, QLANG2, PLANG2, metrics=["recall@10"])
    assert out["pairs"]["ja->en"] == {"recall@10": 0.5, "n": 1}  # en:a of {en:a, en:gone}
    assert out["pairs"]["ja->de"] == {"recall@10": 0.5, "n": 2}  # ja:1 counted: 0 of 1


def test_pair_views_drop_positives_of_another_corpus_language():
    qrels = {"ja:1": {"en:a": 1, "de:a": 1}, "ja:2": {"de:a": 1}}
    out = M.evaluate_languages(PAIR_RUNS2, qrels, QLANG2, PLANG2, metrics=["recall@10"])
    assert out["pairs"]["ja->en"] == {"recall@10": 1.0, "n": 1}  # de:a is not the en pair's
    assert out["pairs"]["ja->de"] == {"recall@10": 1.0, "n": 2}


def test_evaluate_languages_with_answers():
    qrels = {"ja:1": {"en:a": 1}, "ja:2": {"en:b": 1}}
    qlang = {"ja:1": "ja", "ja:2": "ja"}
    plang = {"en:a": "en", "en:b": "en"}
    run = {"ja:1": {"en:a": 1.0, "en:b": 0.5}, "ja:2": {"en:a": 1.0, "en:b": 0.5}}
    texts = {"en:a": "Tokyo is large", "en:b": "Kyoto"}
    out = M.evaluate_languages({("ja", "en"): run}, qrels, qlang, plang, metrics=["mrr@10"],
                               answers={"ja:1": ["Kyoto"], "ja:2": ["no"]}, passages=texts)
    pair = out["pairs"]["ja->en"]
    assert pair["r@2kt"] == 1.0 and pair["n_kt"] == 1 and pair["n"] == 2
    assert pair["mrr@10"] == pytest.approx(0.75)
    assert out["macro"]["x->en"]["r@5kt"] == 1.0
    with pytest.raises(ValueError, match="passages"):
        M.evaluate_languages({("ja", "en"): run}, qrels, qlang, plang, answers={})


def test_teacher_rerank_compares_orders_of_the_same_lists():
    from qgscale.eval.rerank import OrderMetrics, compare_orders, markdown, rerank_metric_names

    lists = {"q1": ["a", "b", "c"], "q2": ["d", "e", "f"], "q3": ["g", "h", "i"]}
    student = {"q1": {"a": 3, "b": 2, "c": 1}, "q2": {"d": 3, "e": 2, "f": 1},
               "q3": {"g": 3, "h": 2, "i": 1}}
    teacher = {"q1": {"a": -5, "b": -1, "c": -3}, "q2": {"d": -1, "e": -2, "f": -3},
               "q3": {"g": -1, "h": -2, "i": -3}}
    qrels = {"q1": {"b": 1}, "q2": {"f": 1}, "q3": {"x": 1}}  # q3: relevant not in the list
    names = rerank_metric_names(3)
    assert names == ["mrr@10", "recall@1"]
    r = compare_orders(lists, student, teacher, qrels, {"q1": "de", "q2": "de", "q3": "es"},
                       names)
    # de: student ranks b 2nd and f 3rd; the teacher ranks b 1st and f 3rd
    assert r["student"]["query_langs"]["de"]["mrr@10"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert r["teacher"]["query_langs"]["de"]["mrr@10"] == pytest.approx((1 + 1 / 3) / 2)
    assert r["teacher"]["query_langs"]["de"]["recall@1"] == pytest.approx(0.5)
    assert r["student"]["query_langs"]["es"]["mrr@10"] == 0.0  # a miss for both orders
    assert r["teacher"]["macro"]["mrr@10"] == pytest.approx(((1 + 1 / 3) / 2 + 0) / 2)
    assert "| de | teacher | 0.6667 | 0.5000 |" in markdown(r, names, 3)
    # a block of queries at a time (q1, then q2 and q3): the same numbers
    acc = OrderMetrics(names)
    for block in (["q1"], ["q2", "q3"]):
        acc.add({q: lists[q] for q in block}, student, teacher, qrels,
                {"q1": "de", "q2": "de", "q3": "es"})
    assert acc.result() == r


def test_answer_qrels_of_a_run_name_a_passage_not_in_the_corpus(tmp_path, ray_local):
    """Answer-match relevance (XOR-TyDi, MKQA) checks the run's top-k passages in one pass
    over the corpus on the answer check's actors: those with an answer are relevant ("title
    text"; queries without answers or hits left out); a pid the corpus lacks (a run from
    another corpus) is an error."""
    from types import SimpleNamespace

    import pyarrow as pa

    from qgscale import storage
    from qgscale.config import BM25Config
    from qgscale.data.schema import CORPUS
    from qgscale.errors import DataError
    from qgscale.eval.evaluate import EvalData
    from qgscale.eval.rerank import answer_qrels

    corpus = str(tmp_path / "corpus")
    rows = [{"pid": "a", "lang": "en", "title": "", "text": "Paris is in France"},
            {"pid": "b", "lang": "en", "title": "", "text": "Berlin is in Germany"},
            {"pid": "c", "lang": "en", "title": "Paris", "text": "a city"}]
    for i in range(2):
        storage.write_parquet(f"{corpus}/part-{i:05d}.parquet",
                              pa.Table.from_pylist(rows[i * 2:i * 2 + 2], schema=CORPUS))
    answers = str(tmp_path / "answers.parquet")
    storage.write_parquet(answers, pa.table({"qid": ["q1", "q2", "q3"], "answers": [
        ["Paris"], [], ["Rome"]]}))
    data = EvalData(["q1", "q2", "q3"], ["Where?"] * 3, {"q1": "de", "q2": "de", "q3": "de"},
                    {}, corpus, {"q1": ["Paris"], "q2": [], "q3": ["Rome"]},
                    {"answers": answers})
    cfg = SimpleNamespace(bm25=BM25Config(num_actors=1, cpus_per_actor=0.5))
    run = str(tmp_path / "run.parquet")
    storage.write_parquet(run, pa.table({"qid": ["q1", "q2", "q3"], "pids": [
        ["b", "a", "c"], ["a", "b", "c"], ["a", "b", "c"]]}))
    assert answer_qrels(cfg, run, 3, data, str(tmp_path / "w1"), "k") == {
        "q1": {"a": 1, "c": 1}}
    # the same work folder and key: k is part of the hits' key, so k=3's are not reused
    assert answer_qrels(cfg, run, 2, data, str(tmp_path / "w1"), "k") == {"q1": {"a": 1}}
    storage.write_parquet(run, pa.table({"qid": ["q1"], "pids": [["b", "zz"]]}))
    with pytest.raises(DataError, match=r"1 retrieved pid\(s\) not in the corpus .*\['zz'\]"):
        answer_qrels(cfg, run, 2, data, str(tmp_path / "w3"), "k")


def test_macro_averages_each_metric_over_the_groups_that_have_it():
    """A pair with answers but no qrels (R@kt, no MRR) neither drops MRR from the macro nor
    counts as 0 in it; the groups behind a metric that only some have are counted."""
    de = {"mrr@10": 0.5, "r@2kt": 1.0, "n": 4, "n_kt": 4}
    te = {"r@2kt": 0.0, "n": 0, "n_kt": 3}
    out = M.macro([de, te])
    assert out == {"mrr@10": 0.5, "groups:mrr@10": 1, "r@2kt": 0.5, "groups": 2}
    assert M.macro([]) == {"groups": 0}


def test_rerank_of_a_run_with_a_query_twice_is_an_error(tmp_path):
    """A run lists each query once; a qid on two rows would be compared (and scored) twice."""
    import pyarrow as pa

    from qgscale import config, storage
    from qgscale.data.schema import CANDIDATES
    from qgscale.errors import DataError
    from qgscale.eval.rerank import run_rerank
    from tests.conftest import REPO

    run = str(tmp_path / "run.parquet")
    storage.write_parquet(run, pa.Table.from_pylist(
        [{"qid": q, "pids": ["a"], "scores": [1.0]} for q in ("q1", "q2", "q1")],
        schema=CANDIDATES))
    cfg = config.load(REPO / "configs" / "demo.yaml", [f"run.root={tmp_path / 'root'}"])
    with pytest.raises(DataError, match=r"run.parquet: a qid on two rows"):
        run_rerank(cfg, None, run, str(tmp_path / "data"), "test", str(tmp_path / "out"), "k")
