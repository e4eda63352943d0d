"""DPR's question-answer eval files (``--format qas``: ``nq-test.qas.csv``) and DPR's top-k
retrieval accuracy (``acc@k``), as a user evaluating on NQ / TriviaQA runs them.

The CLI and pipeline tests write the questions and answers of the 5 real NQ-dev records of
haystack's DPR sample (tests/data/dpr) as DPR's files are: ``question<TAB>answers`` with a
Python list literal; the reader's own test uses rows written by hand for each case."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qgscale import cli, config, pipeline, storage
from qgscale.data import readers
from qgscale.data.prepare import prepare
from qgscale.errors import DataError
from qgscale.eval import metrics as M
from qgscale.layout import Layout, answer_positives
from qgscale.retrieval.answers import has_answer
from tests.conftest import REPO
from tests.test_dpr_pipeline import _records, collection
from tests.test_xor_mkqa import CPU, XOR_SET, merged, overrides


def qas_file(path: Path, records: list[dict]) -> Path:
    """``records`` (DPR training records) as DPR's ``*.qas.csv``."""
    path.write_text("".join(f"{r['question']}\t{r['answers']!r}\n" for r in records),
                    encoding="utf-8")
    return path


def test_qas_rows_and_every_defect_named(tmp_path):
    good = ["who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']",
            '"who sang ""i will always love you"""\t["Dolly Parton", \'Whitney Houston\']',
            "",
            "who played in love story\t[\"Ryan O'Neal\", 'Ali MacGraw']"]
    path = tmp_path / "nq-test.qas.csv"
    path.write_text("\n".join(good) + "\n", encoding="utf-8")
    t = readers.read_qas(str(path), "en")
    assert t["queries"] == [
        {"qid": "0", "lang": "en", "text": "who got the first nobel prize in physics"},
        {"qid": "1", "lang": "en", "text": 'who sang "i will always love you"'},
        {"qid": "3", "lang": "en", "text": "who played in love story"}]  # qid: line - 1
    assert t["answers"] == [{"qid": "0", "answers": ["Wilhelm Conrad Röntgen"]},
                            {"qid": "1", "answers": ["Dolly Parton", "Whitney Houston"]},
                            {"qid": "3", "answers": ["Ryan O'Neal", "Ali MacGraw"]}]
    gz = tmp_path / "nq-test.qas.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert readers.read_qas(str(gz), "en") == t

    bad = {"only a question": (None, "expected 2 tab-separated columns"),
           " \t['a']": ("question", "empty text"),
           "q\t['unclosed": ("answers", "not a Python list literal"),
           "q\t__import__('os').getcwd()": ("answers", "not a Python list literal"),
           "q\t'one answer'": ("answers", "expected a list of strings"),
           "q\t[1, 2]": ("answers", "expected a list of strings"),
           "q\t[]": ("answers", "no answer"),
           "q\t['', ' ']": ("answers", "no answer")}
    path.write_text("\n".join([good[0], *bad]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"nq-test.qas.csv:2: expected 2 tab-separated"):
        readers.read_qas(str(path))
    rejects = readers.Rejects("skip")
    t = readers.read_qas(str(path), "en", rejects)
    assert [q["qid"] for q in t["queries"]] == ["0"]
    got = [(r["line"], r["field"], r["reason"]) for r in rejects.rows]
    assert [(line, fld) for line, fld, _ in got] == [(i + 2, f) for i, (f, _) in
                                                     enumerate(bad.values())]
    for (_, _, reason), (_, want) in zip(got, bad.values(), strict=True):
        assert want in reason
    # as DPR's csv.reader over the file: a quoted field may span lines (the row is named by
    # its first line), empty columns after the answers are no column, CRLF line ends; blank
    # answers beside a real one are kept (the metrics ignore them)
    path.write_bytes(b'"who wrote\nthis"\t["Anne"]\t\r\nq2\t["", "B"]\r\n\t\nq4\t["C"]\n')
    rejects = readers.Rejects("skip")
    t = readers.read_qas(str(path), "en", rejects)
    assert t["queries"] == [{"qid": "0", "lang": "en", "text": "who wrote\nthis"},
                            {"qid": "2", "lang": "en", "text": "q2"},
                            {"qid": "4", "lang": "en", "text": "q4"}]
    assert t["answers"][1] == {"qid": "2", "answers": ["", "B"]}
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(4, "question")]  # a bare tab
    path.write_text("q\t['a']\n" + "q2\t['" + "x" * 200_000 + "']\nq3\t['c']\n",
                    encoding="utf-8")
    rejects = readers.Rejects("skip")
    t = readers.read_qas(str(path), "en", rejects)
    assert [q["qid"] for q in t["queries"]] == ["0", "2"]
    assert rejects.rows[0]["line"] == 2 and "unreadable CSV row" in rejects.rows[0]["reason"]
    path.write_bytes(b"q\t['a']\nq2\t['\xff']\n")
    with pytest.raises(DataError, match=r":2: undecodable bytes"):
        readers.read_qas(str(path))
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no rows \(empty file\)"):
        readers.read_qas(str(path))


def test_qas_prepare_from_the_cli(tmp_path):
    records = _records()
    qas = qas_file(tmp_path / "nq-dev.qas.csv", records)
    coll = tmp_path / "psgs_w100.tsv"
    texts = collection(coll, records)
    run = CliRunner().invoke
    out = tmp_path / "dev"
    res = run(cli.app, ["data", "prepare", "--format", "qas", "--input", str(qas), "--output",
                        str(out), "--lang", "en"])
    assert res.exit_code == 0, res.output
    assert storage.read_manifest(str(out))["rows"] == {"queries": 5, "answers": 5}
    assert storage.read_parquet(str(out / "answers")).to_pylist()[2] == {
        "qid": "2", "answers": records[2]["answers"]}
    res = run(cli.app, ["data", "prepare", "--format", "qas", "--input", str(qas), "--output",
                        str(tmp_path / "with"), "--passages", str(coll), "--corpus-langs", "en",
                        "--lang", "en"])
    assert res.exit_code == 0, res.output
    corpus = storage.read_parquet(str(tmp_path / "with" / "corpus")).to_pylist()
    assert {r["pid"]: (r["title"], r["text"]) for r in corpus} == texts
    assert {r["lang"] for r in corpus} == {"en"}
    for args, why in (
            ([], "data.lang: a qas file's questions carry no language"),
            (["--lang", "en", "--passages", str(coll)],
             "give the collection's language as data.corpus_langs"),
            (["--lang", "en", "--corpus-langs", "en"], "a qas file holds no passages"),
            (["--lang", "en", "--corpus-langs", "en,de", "--passages", str(coll)],
             "carry no language"),
            (["--lang", "en", "--query-langs", "en"], "--format qas does not use --query-langs")):
        res = run(cli.app, ["data", "prepare", "--format", "qas", "--input", str(qas),
                            "--output", str(tmp_path / "x"), *args])
        assert res.exit_code != 0 and why in " ".join(res.output.split()), res.output


def test_answer_accuracy_is_dprs_top_k_accuracy():
    texts = {"a": "The prize went to a physicist.", "b": "Röntgen won it.",
             "c": "Wilhelm Conrad Röntgen, in 1901.", "d": "nothing here"}
    run = {"q": {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}}
    got = M.answer_accuracy_per_query(run, texts, {"q": ["Wilhelm Conrad Röntgen"]}, [1, 2, 3])
    assert got == {"q": {"acc@1": 0.0, "acc@2": 0.0, "acc@3": 1.0}}
    # tokens, not substrings: "physics" is not in "physicist"; case and NFD forms agree
    assert M.answer_accuracy_per_query(run, texts, {"q": ["physics"]}, [4])["q"]["acc@4"] == 0
    nfd = "Ro\u0308ntgen"
    assert M.answer_accuracy_per_query(run, texts, {"q": [nfd.upper()]}, [2]) == {
        "q": {"acc@2": 1.0}}
    # not counted: no usable answer (blank, yes / no); the scan stops at the first hit
    assert M.answer_accuracy_per_query(run, texts, {"q": ["yes", " "]}, [1]) == {}
    yes_no = {"a": "yes, it went to him", "b": "Röntgen"}
    assert M.answer_accuracy_per_query({"q": {"a": 2.0, "b": 1.0}}, yes_no,
                                       {"q": ["yes", "", "Röntgen"]}, [1, 2]) == {
        "q": {"acc@1": 0.0, "acc@2": 1.0}}
    assert M.answer_accuracy_per_query({"q": {"b": 2.0, "zz": 1.0}}, texts, {"q": ["won"]},
                                       [2]) == {"q": {"acc@2": 1.0}}
    with pytest.raises(KeyError, match="no text for retrieved passage 'zz'"):
        M.answer_accuracy_per_query({"q": {"zz": 2.0, "b": 1.0}}, texts, {"q": ["won"]}, [2])

    # random runs: equal to any(has_answer) over each query's first k passages
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "Ωmega", "東京", "a.b", "x-y"]
    bodies = {f"p{i}": " ".join(rng.choices(words, k=6)) for i in range(40)}
    runs = {f"q{j}": {p: rng.random() for p in rng.sample(sorted(bodies), 12)}
            for j in range(60)}
    answers = {q: [" ".join(rng.choices(words, k=rng.choice([1, 2])))] for q in runs}
    ks = [1, 3, 10]
    got = M.answer_accuracy_per_query(runs, bodies, answers, ks)
    assert len(got) == len(runs)
    for q, row in got.items():
        ranked = M.ranking(runs[q])
        for k in ks:
            assert row[f"acc@{k}"] == float(any(has_answer(answers[q], bodies[p])
                                                for p in ranked[:k])), (q, k)
    assert 0 < sum(r["acc@1"] for r in got.values()) < sum(r["acc@10"] for r in got.values())


def test_answer_accuracy_in_the_language_views():
    qlang = {"q1": "en", "q2": "en", "q3": "en"}
    plang = {"a": "en", "b": "en"}
    run = {"q1": {"a": 2.0, "b": 1.0}, "q2": {"a": 2.0, "b": 1.0}, "q3": {"a": 1.0}}
    bodies = {"a": "Paris is big", "b": "Rome too"}
    answers = {"q1": ["Rome"], "q2": ["Paris"], "q3": ["no"]}  # q3: not counted
    acc = M.LanguageMetrics(["mrr@10"], accuracy_ks=[1, 2])
    acc.add({("en", "en"): run}, {"q1": {"b": 1}}, qlang, plang, run, answers, bodies=bodies)
    out = acc.result()
    pair = out["pairs"]["en->en"]
    assert pair == {"mrr@10": 0.5, "acc@1": 0.5, "acc@2": 1.0, "n": 1, "n_acc": 2}
    assert out["query_langs"]["en"] == pair  # the pooled view: the same run
    assert out["macro"]["monolingual"] == {"acc@1": 0.5, "acc@2": 1.0, "mrr@10": 0.5,
                                           "groups": 1}
    with pytest.raises(ValueError, match="answer accuracy needs answers and bodies"):
        acc.add({("en", "en"): run}, {}, qlang, plang, answers=answers)
    # answers only (a qas split): the pair is scored, its n is the answer count
    only = M.LanguageMetrics(["mrr@10"], accuracy_ks=[1])
    only.add({("en", "en"): run}, {}, qlang, plang, answers=answers, bodies=bodies)
    res = only.result()
    assert res["pairs"]["en->en"] == {"acc@1": 0.5, "n": 0, "n_acc": 2}
    assert res["macro"]["monolingual"]["groups"] == 1
    from qgscale.eval.evaluate import markdown_table

    table = markdown_table(res, M.report_names([1]))
    assert "| pair | n | acc@1 |" in table and "| en->en | 2 | 0.5000 |" in table


def test_answer_metrics_once_per_run_and_language(monkeypatch):
    """With one corpus language the pair's run is the pooled one: its answer metrics are
    computed once per query language, not once per view; two runs are two computations."""
    calls = []
    real = M.answer_accuracy_per_query
    monkeypatch.setattr(M, "answer_accuracy_per_query",
                        lambda run, *a, **k: calls.append(id(run)) or real(run, *a, **k))
    qlang = {"q1": "en", "q2": "de"}
    run = {"q1": {"a": 1.0}, "q2": {"a": 1.0}}
    bodies, answers = {"a": "Rome"}, {"q1": ["Rome"], "q2": ["Paris"]}
    acc = M.LanguageMetrics([], accuracy_ks=[1])
    acc.add({("en", "en"): run, ("de", "en"): run}, {}, qlang, {"a": "en"}, run, answers,
            bodies=bodies)
    assert sorted(calls) == [id(run)] * 2  # en and de, each once for two views
    out = acc.result()
    assert out["query_langs"]["en"]["acc@1"] == out["pairs"]["en->en"]["acc@1"] == 1.0
    assert out["query_langs"]["de"]["acc@1"] == out["pairs"]["de->en"]["acc@1"] == 0.0
    calls.clear()
    other = {q: dict(r) for q, r in run.items()}
    acc.add({("en", "en"): other}, {}, {"q1": "en"}, {"a": "en"}, run, answers, bodies=bodies)
    assert calls == [id(other), id(run)]


def test_summary_and_chart_show_the_answer_metrics_a_split_has():
    from qgscale.eval.evaluate import chart_metric

    qas = {"pairs": {"en->en": {"acc@1": 0.4, "acc@20": 0.7, "n": 0, "n_acc": 9}}}
    xor = {"pairs": {"te->en": {"r@2kt": 0.3, "acc@20": 0.5, "n": 0, "n_kt": 4, "n_acc": 4}}}
    xquad = {"pairs": {"de->en": {"mrr@10": 0.6, "n": 5}}}
    assert [chart_metric(r, None) for r in (qas, xor, xquad)] == ["acc@20", "r@2kt", "mrr@10"]
    assert chart_metric(qas, "acc@1") == "acc@1"
    macro = {"acc@20": 0.7, "acc@100": 0.9, "r@2kt": 0.3, "groups": 1}
    table = pipeline.summary_table({"distill": {"test": {"macro": {"x->en": macro},
                                                         "query_langs_macro": macro}}})
    assert table.splitlines()[0] == ("| student | split | mrr@10 | recall@1 | recall@10 | "
                                     "ndcg@10 | r@2kt | acc@20 | acc@100 |")
    assert table.splitlines()[2] == "| distill | test | - | - | - | - | 0.3000 | 0.7000 | 0.9000 |"


def test_block_scorer_matches_answers_in_the_text_not_the_title(tmp_path):
    """acc@k reads each passage's text without its title (DPR), R@kt both; answer metrics
    follow eval.answer_recall / eval.answer_accuracy."""
    from qgscale.data.prepare import write_tables
    from qgscale.eval.evaluate import BlockScorer, EvalData

    corpus = [{"pid": "a", "lang": "en", "title": "Kyoto", "text": "an old capital"},
              {"pid": "b", "lang": "en", "title": "Japan", "text": "Kyoto is in Japan"}]
    write_tables({"corpus": corpus}, str(tmp_path / "data"))
    data = EvalData(["q"], ["which city"], {"q": "en"}, {}, str(tmp_path / "data" / "corpus"),
                    {"q": ["Kyoto"]})
    run = {"q": {"a": 2.0, "b": 1.0}}
    results = {}
    for recall, accuracy in ((True, "dpr"), (False, "dpr"), (True, "off"), (False, "off")):
        scorer = BlockScorer(data, [1, 2], answer_recall=recall, answer_accuracy=accuracy)
        scorer.add(["q"], run, {("en", "en"): run})
        results[recall, accuracy] = scorer.result()["pairs"]["en->en"]
    assert results[True, "dpr"] == {"r@2kt": 1.0, "r@5kt": 1.0, "acc@1": 0.0, "acc@2": 1.0,
                                    "n": 0, "n_kt": 1, "n_acc": 1}
    assert results[False, "dpr"] == {"acc@1": 0.0, "acc@2": 1.0, "n": 0, "n_acc": 1}
    assert results[True, "off"] == {"r@2kt": 1.0, "r@5kt": 1.0, "n": 0, "n_kt": 1}
    assert results[False, "off"] == {"n": 0}  # no answer metric: the texts are not read

    # a corpus written without spaces: DPR's tokens are whole clauses, dpr-chars splits them
    write_tables({"corpus": [{"pid": "z", "lang": "ja", "title": "",
                              "text": "東京は日本の首都です"}]}, str(tmp_path / "ja"))
    ja = EvalData(["q"], ["首都は"], {"q": "ja"}, {}, str(tmp_path / "ja" / "corpus"),
                  {"q": ["東京"]})
    found = {}
    for match in ("dpr", "dpr-chars"):
        scorer = BlockScorer(ja, [1], answer_recall=False, answer_accuracy=match)
        scorer.add(["q"], {"q": {"z": 1.0}}, {("ja", "ja"): {"q": {"z": 1.0}}})
        found[match] = scorer.result()["pairs"]["ja->ja"]["acc@1"]
    assert found == {"dpr": 0.0, "dpr-chars": 1.0}


@pytest.mark.slow
def test_pipeline_on_qas_data_bm25_positives_and_accuracy(tmp_path, ray_local):
    """``data.format: qas`` trains from answers: the bm25 stage's answer-match examples over
    the collection (DPR's own recipe); the BM25 eval row on a qas eval set has acc@k as
    computed here from its run."""
    records = _records()
    train = qas_file(tmp_path / "nq-train.qas.csv", records[:3])
    dev = qas_file(tmp_path / "nq-dev.qas.csv", records[3:])
    coll = tmp_path / "psgs_w100.tsv"
    texts = collection(coll, records)
    assert prepare("qas", str(dev), str(tmp_path / "data-dev"), lang="en")["rows"] == {
        "queries": 2, "answers": 2}
    sets = overrides(merged(CPU, XOR_SET, {
        "run": {"root": str(tmp_path / "run")},
        "data": {"format": "qas", "input": str(train), "passages": str(coll),
                 "query_langs": None, "lang": "en", "shard_rows": 200},
        "eval": {"data": str(tmp_path / "data-dev")}}))
    cfg = config.load(REPO / "configs" / "xor-tydi.yaml", sets)
    assert answer_positives(cfg)  # bm25.positives: auto
    for stage in ("prepare", "bm25", "bm25-eval"):
        pipeline.run(cfg, only=stage)
    lay = Layout(cfg)
    assert storage.read_manifest(lay.data_root)["rows"] == {"queries": 3, "answers": 3,
                                                            "corpus": len(texts)}
    examples = storage.read_parquet(lay.train("examples")).to_pylist()
    answers = {str(i): r["answers"] for i, r in enumerate(records[:3])}
    assert len(examples) >= 2
    for ex in examples:  # DPR's match on the passage text
        assert ex["pos_pids"] and ex["neg_pids"]
        assert all(has_answer(answers[ex["qid"]], texts[p][1]) for p in ex["pos_pids"])
        assert not any(has_answer(answers[ex["qid"]], texts[p][1]) for p in ex["neg_pids"])

    # the eval stage's BM25 row (evaluate_baseline), without training the students
    from qgscale.eval.evaluate import evaluate_baseline

    bm25_run = storage.join(lay.bm25_eval("test"), "run.parquet")
    got = evaluate_baseline(cfg, bm25_run, lay.eval_data(), "test", lay.data("test", "corpus"),
                            str(tmp_path / "bm25-row"))
    dev_answers = {str(i): r["answers"] for i, r in enumerate(records[3:])}
    hits = {}
    for r in storage.read_parquet(bm25_run).to_pylist():
        order = [p for _, p in sorted(zip(r["scores"], r["pids"], strict=True),
                                      key=lambda x: (-x[0], x[1]))]
        hits[r["qid"]] = next((i for i, p in enumerate(order)
                               if has_answer(dev_answers[r["qid"]], texts[p][1])), None)
    assert set(hits) == {"0", "1"}
    pair = got["pairs"]["en->en"]
    assert pair["n_acc"] == 2 and pair["n"] == 0 and "mrr@10" not in pair
    for k in cfg.eval.k:
        want = sum(h is not None and h < k for h in hits.values()) / 2
        assert pair[f"acc@{k}"] == want, k
    assert pair[f"acc@{cfg.eval.k[-1]}"] > 0
    md = storage.read_bytes(str(tmp_path / "bm25-row" / "test" / "metrics.md")).decode()
    assert "| pair | n | r@2kt | r@5kt | acc@1 | acc@5 | acc@20 |" in md
