"""Readers on the real files in ../shared/data and on a corpus of broken inputs."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict

import pytest

from qgscale import storage
from qgscale.data import readers
from qgscale.data.prepare import export_jsonl, prepare, read
from qgscale.errors import DataError

from .conftest import SHARED_DATA

XQUAD_SOURCES = [readers.bundled("xquad"), str(SHARED_DATA / "xquad")]


@pytest.mark.parametrize("folder", XQUAD_SOURCES, ids=["bundled", "shared"])
def test_xquad_counts_and_split(folder):
    t = read("xquad", folder)
    queries = t["train/queries"] + t["test/queries"]
    corpus = t["train/corpus"] + t["test/corpus"]
    assert len(queries) == 12 * 1190
    per_lang = defaultdict(int)
    for p in corpus:
        per_lang[p["lang"]] += 1
    assert dict(per_lang) == {lang: 240 for lang in readers.XQUAD_LANGS}
    # Split by article: pid is lang:article-paragraph; test articles are article % 4 == 0.
    for split in ("train", "test"):
        arts = {int(p["pid"].split(":")[1].split("-")[0]) for p in t[f"{split}/corpus"]}
        assert all((a % 4 == 0) == (split == "test") for a in arts)
        judged = {r["pid"] for r in t[f"{split}/qrels"]}
        assert judged <= {p["pid"] for p in t[f"{split}/corpus"]}
    assert not {q["qid"] for q in t["train/queries"]} & {q["qid"] for q in t["test/queries"]}


def test_xquad_qrels_match_the_raw_json():
    raw = json.load(open(SHARED_DATA / "xquad" / "xquad.ru.json", encoding="utf-8"))
    expected = {}
    for _a, article in enumerate(raw["data"]):
        for _p, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                expected[f"ru:{qa['id']}"] = (para["context"].strip(), qa["question"].strip())
    t = read("xquad", str(SHARED_DATA / "xquad"), query_langs=["ru"], corpus_langs=["ru", "en"])
    texts = {p["pid"]: p["text"] for s in ("train", "test") for p in t[f"{s}/corpus"]}
    queries = {q["qid"]: q["text"] for s in ("train", "test") for q in t[f"{s}/queries"]}
    qrels = defaultdict(set)
    for s in ("train", "test"):
        for r in t[f"{s}/qrels"]:
            qrels[r["qid"]].add(r["pid"])
    assert set(queries) == set(expected)
    for qid, (context, question) in expected.items():
        assert queries[qid] == question
        assert len(qrels[qid]) == 2  # its paragraph in ru and in en
        ru_pid = next(p for p in qrels[qid] if p.startswith("ru:"))
        assert texts[ru_pid] == context
        assert "en:" + ru_pid[3:] in qrels[qid]


def test_mkqa_sample():
    t = read("mkqa", str(SHARED_DATA / "mkqa" / "test_mkqa.jsonl.gz"))
    raw = [json.loads(line) for line in gzip.open(SHARED_DATA / "mkqa" / "test_mkqa.jsonl.gz")]
    assert len(t["queries"]) == sum(len(r["queries"]) for r in raw)
    first = raw[0]
    q = {x["qid"]: x for x in t["queries"]}
    a = {x["qid"]: x["answers"] for x in t["answers"]}
    key = f"de:{first['example_id']}"
    assert q[key]["text"] == first["queries"]["de"].strip()
    assert first["answers"]["de"][0]["text"] in a[key]
    only = read("mkqa", str(SHARED_DATA / "mkqa" / "test_mkqa.jsonl.gz"), query_langs=["ja"])
    assert {x["lang"] for x in only["queries"]} == {"ja"} and len(only["queries"]) == len(raw)


def test_tatoeba_pairs():
    t = read("tatoeba", str(SHARED_DATA / "tatoeba"), query_langs=["deu", "tha"])
    assert len([q for q in t["queries"] if q["lang"] == "deu"]) == 1000
    assert len([q for q in t["queries"] if q["lang"] == "tha"]) == 548
    deu = open(SHARED_DATA / "tatoeba" / "tatoeba.deu-eng.deu", encoding="utf-8").read()
    eng = open(SHARED_DATA / "tatoeba" / "tatoeba.deu-eng.eng", encoding="utf-8").read()
    q = {x["qid"]: x["text"] for x in t["queries"]}
    c = {x["pid"]: x["text"] for x in t["corpus"]}
    assert q["deu:3"] == deu.splitlines()[3].strip() and c["eng-deu:3"] == eng.splitlines()[3]
    assert {"qid": "deu:3", "pid": "eng-deu:3", "rel": 1} in t["qrels"]
    bundled = read("tatoeba", readers.bundled("tatoeba"), query_langs=["deu"])
    assert bundled["queries"] == [x for x in t["queries"] if x["lang"] == "deu"]


def _write(path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_xor_tydi_and_dpr_passages(tmp_path):
    q = _write(tmp_path / "xor_dev.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "-1001", "lang": "ja", "question": "日本の首都は？", "answers": ["Tokyo"]},
        {"id": "-1002", "lang": "fi", "question": "Mikä on Suomen pääkaupunki?",
         "answers": ["Helsinki", "Helsingfors"]}]))
    p = _write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\tTokyo is the capital.\tTokyo\n"
                                      "2\tHelsinki is the capital of Finland.\tHelsinki\n")
    t = read("xor-tydi", q, passages=p)
    assert [x["qid"] for x in t["queries"]] == ["-1001", "-1002"]
    assert t["answers"][1]["answers"] == ["Helsinki", "Helsingfors"]
    assert t["corpus"][1] == {"pid": "2", "lang": "en", "title": "Helsinki",
                              "text": "Helsinki is the capital of Finland."}


def test_beir_folder(tmp_path):
    _write(tmp_path / "b" / "corpus.jsonl", '{"_id": "d1", "title": "", "text": "alpha"}\n'
                                            '{"_id": "d2", "title": "T", "text": "beta"}\n')
    _write(tmp_path / "b" / "queries.jsonl", '{"_id": "q1", "text": "a?"}\n{"_id": "q2", '
                                             '"text": "b?"}\n')
    _write(tmp_path / "b" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    _write(tmp_path / "b" / "qrels" / "dev.tsv", "query-id\tcorpus-id\tscore\nq2\td2\t2\n")
    t = read("beir", str(tmp_path / "b"), lang="sw")
    assert t["test/qrels"] == [{"qid": "q1", "pid": "d1", "rel": 1}]
    assert t["dev/queries"] == [{"qid": "q2", "lang": "sw", "text": "b?"}]
    assert len(t["corpus"]) == 2


# Broken inputs: each defect must give an error naming file, line and field.
GOOD = '{"qid": "q1", "lang": "de", "text": "Wer?"}'
DEFECTS = {
    "malformed": ('{"qid": "q2", "lang": "de", "text": "Was?"', r":2: malformed JSON"),
    "missing": ('{"qid": "q2", "lang": "de"}', r":2: field 'text': missing field"),
    "empty": ('{"qid": "q2", "lang": "de", "text": "   "}', r":2: field 'text': empty text"),
    "wrong_type": ('{"qid": "q2", "lang": "de", "text": 7}',
                   r":2: field 'text': wrong type: expected string, got int"),
    "not_object": ('["q2", "de", "Was?"]', r":2: expected a JSON object, got list"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_broken_jsonl_fails_with_file_line_field(tmp_path, defect):
    line, pattern = DEFECTS[defect]
    path = _write(tmp_path / f"{defect}.jsonl", f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(DataError, match=f"{defect}.jsonl{pattern}"):
        read("jsonl", path, kind="queries")


def test_undecodable_bytes(tmp_path):
    path = _write(tmp_path / "bytes.jsonl", GOOD.encode() + b"\n" +
                  b'{"qid": "q2", "lang": "de", "text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: undecodable bytes"):
        read("jsonl", path, kind="queries")
    tsv = _write(tmp_path / "p.tsv", b"id\ttext\ttitle\n1\tok\tT\n2\t\xc3\x28\tT\n")
    with pytest.raises(DataError, match=r"p.tsv:3: undecodable bytes"):
        read("xor-tydi", _write(tmp_path / "q.jsonl", ""), passages=tsv)


def test_format_specific_defects(tmp_path):
    with pytest.raises(DataError, match=r"xor.jsonl:1: field 'question': missing field"):
        read("xor-tydi", _write(tmp_path / "xor.jsonl", '{"id": "1", "lang": "ja"}\n'))
    with pytest.raises(DataError, match=r"xor2.jsonl:1: field 'answers': wrong type"):
        read("xor-tydi", _write(tmp_path / "xor2.jsonl", '{"id": "1", "lang": "ja", '
                                '"question": "q", "answers": "Tokyo"}\n'))
    with pytest.raises(DataError, match=r"psg.tsv:2: expected 3 tab-separated columns"):
        read("xor-tydi", _write(tmp_path / "x.jsonl", ""),
             passages=_write(tmp_path / "psg.tsv", "id\ttext\ttitle\n1\tonly two\n"))
    with pytest.raises(DataError, match=r"mk.jsonl:1: field 'queries.de': empty text"):
        read("mkqa", _write(tmp_path / "mk.jsonl", '{"example_id": 1, "queries": {"de": ""}, '
                            '"answers": {}}\n'))
    with pytest.raises(DataError, match=r"q.tsv:2: field 'score': wrong type"):
        readers.read_qrels_tsv(_write(tmp_path / "q.tsv", "query-id\tcorpus-id\tscore\n"
                                                          "q1\td1\thigh\n"))
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'pids': empty list"):
        read("jsonl", _write(tmp_path / "c.jsonl", '{"qid": "q", "pids": []}\n'),
             kind="candidates")
    bad = tmp_path / "xq"
    _write(bad / "xquad.en.json", '{"data": [{"title": "T", "paragraphs": [{"context": "",'
                                  ' "qas": []}]}]}')
    with pytest.raises(DataError, match=r"xquad.en.json: field 'data\[0\].paragraphs\[0\]."
                                        r"context': empty text"):
        read("xquad", str(bad), query_langs=["en"], corpus_langs=["en"])
    _write(bad / "xquad.de.json", '{"data": [{"title": "T", "paragraphs": [{"context": "x",\n'
                                  ' "qas": [}]}]}')
    with pytest.raises(DataError, match=r"xquad.de.json:2: malformed JSON"):
        read("xquad", str(bad), query_langs=["de"], corpus_langs=["de"])


def test_skip_mode_accounts_for_every_row(tmp_path):
    lines = [GOOD] + [DEFECTS[d][0] for d in sorted(DEFECTS)] + [GOOD.replace("q1", "q9")]
    path = _write(tmp_path / "mixed.jsonl", "\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    summary = prepare("jsonl", path, out, kind="queries", on_error="skip")
    assert summary["rows"] == {"queries": 2} and summary["rejected"] == len(DEFECTS)
    rejected = [json.loads(x) for x in open(f"{out}/_rejected.jsonl", encoding="utf-8")]
    assert sorted(r["line"] for r in rejected) == list(range(2, 2 + len(DEFECTS)))
    assert all(r["file"] == path and r["reason"] for r in rejected)
    assert summary["rows"]["queries"] + len(rejected) == len(lines)
    assert storage.read_parquet(f"{out}/queries").num_rows == 2


def test_prepare_to_s3_and_export(s3_bucket, tmp_path):
    out = storage.join(s3_bucket, "xquad")
    summary = prepare("xquad", readers.bundled("xquad"), out, query_langs=["de"],
                      corpus_langs=["en"], shard_rows=500)
    assert summary["rows"]["train/queries"] + summary["rows"]["test/queries"] == 1190
    assert len(storage.list_files(storage.join(out, "train", "queries"), ".parquet")) == 2
    n = export_jsonl(storage.join(out, "test", "corpus"), str(tmp_path / "c.jsonl"))
    back = read("jsonl", str(tmp_path / "c.jsonl"), kind="corpus")["corpus"]
    assert n == len(back) == summary["rows"]["test/corpus"]
