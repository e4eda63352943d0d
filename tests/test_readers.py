"""Readers on real upstream files and on a corpus of broken inputs.

The real files are those the package bundles (``qgscale/resources/``) and the few vendored in
``tests/data/`` (source, commit and licence in each folder's SOURCE.md).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qgscale import storage
from qgscale.data import readers
from qgscale.data.prepare import FORMATS, export_jsonl, prepare, read
from qgscale.errors import ConfigError, DataError, MissingInputError

from .conftest import RESOURCES, TEST_DATA

MKQA = RESOURCES / "mkqa" / "test_mkqa.jsonl.gz"  # the upstream test fixture, byte for byte
TATOEBA = TEST_DATA / "tatoeba"  # deu-eng and tha-eng, plain text as upstream
DPR = TEST_DATA / "dpr" / "sample.json.gz"  # haystack's DPR sample (5 NQ dev records)
PYSERINI = TEST_DATA / "pyserini" / "psgs_w100_pyserini_100.jsonl"
XOR = TEST_DATA / "xor-tydi"
MKQA_MIA = TEST_DATA / "mkqa-mia" / "mkqa_dev"


@pytest.fixture(scope="module")
def xquad_upstream(tmp_path_factory):
    """The upstream XQuAD JSON files: the bundled .json.gz decompressed into a folder, each
    checked against the upstream SHA-256 in tests/data/xquad/SHA256SUMS."""
    out = tmp_path_factory.mktemp("xquad")
    lines = (TEST_DATA / "xquad" / "SHA256SUMS").read_text().splitlines()
    sums = {name: digest for digest, name in (line.split() for line in lines)}
    assert sorted(sums) == sorted(f"xquad.{lang}.json" for lang in readers.XQUAD_LANGS)
    for name, digest in sums.items():
        data = gzip.decompress((RESOURCES / "xquad" / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, f"{name}.gz is not the upstream file"
        (out / name).write_bytes(data)
    return out


@pytest.mark.parametrize("source", ["bundled", "upstream"])
def test_xquad_counts_and_split(source, request):
    if source == "bundled":
        folder = readers.bundled("xquad")
    else:
        folder = str(request.getfixturevalue("xquad_upstream"))
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


def test_xquad_qrels_match_the_raw_json(xquad_upstream):
    raw = json.load(open(xquad_upstream / "xquad.ru.json", encoding="utf-8"))
    expected = {}
    for _a, article in enumerate(raw["data"]):
        for _p, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                expected[f"ru:{qa['id']}"] = (para["context"].strip(), qa["question"].strip())
    t = read("xquad", str(xquad_upstream), query_langs=["ru"], corpus_langs=["ru", "en"])
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
    t = read("mkqa", str(MKQA))
    raw = [json.loads(line) for line in gzip.open(MKQA)]
    assert len(t["queries"]) == sum(len(r["queries"]) for r in raw)
    first = raw[0]
    q = {x["qid"]: x for x in t["queries"]}
    a = {x["qid"]: x["answers"] for x in t["answers"]}
    key = f"de:{first['example_id']}"
    assert q[key]["text"] == first["queries"]["de"].strip()
    assert first["answers"]["de"][0]["text"] in a[key]
    only = read("mkqa", str(MKQA), query_langs=["ja"])
    assert {x["lang"] for x in only["queries"]} == {"ja"} and len(only["queries"]) == len(raw)


def test_tatoeba_pairs():
    t = read("tatoeba", str(TATOEBA), query_langs=["deu", "tha"])
    assert len([q for q in t["queries"] if q["lang"] == "deu"]) == 1000
    assert len([q for q in t["queries"] if q["lang"] == "tha"]) == 548
    deu = open(TATOEBA / "tatoeba.deu-eng.deu", encoding="utf-8").read()
    eng = open(TATOEBA / "tatoeba.deu-eng.eng", encoding="utf-8").read()
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
    # data.query_langs keeps those languages (with their answers); the corpus is English
    t = read("xor-tydi", q, passages=p, query_langs=["fi"], corpus_langs=["en"])
    assert [x["qid"] for x in t["queries"]] == ["-1002"]
    assert [x["qid"] for x in t["answers"]] == ["-1002"] and len(t["corpus"]) == 2
    with pytest.raises(ConfigError, match=r"data.corpus_langs=\['ja'\]: the XOR-Retrieve"):
        read("xor-tydi", q, passages=p, corpus_langs=["ja"])


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
    # prepare streams the corpus (a generator, written shard by shard) to the same rows
    streamed = read("beir", str(tmp_path / "b"), lang="sw", stream=True)
    assert not isinstance(streamed["corpus"], list)
    assert list(streamed["corpus"]) == t["corpus"]
    prepare("beir", str(tmp_path / "b"), str(tmp_path / "out"), lang="sw", shard_rows=1)
    assert storage.read_parquet(str(tmp_path / "out" / "corpus")).to_pylist() == t["corpus"]
    assert len(storage.list_files(str(tmp_path / "out" / "corpus"), ".parquet")) == 2


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


XOR_Q = '{"id": "1", "lang": "ja", "question": "q?", "answers": ["a"]}\n'


def test_undecodable_bytes(tmp_path):
    path = _write(tmp_path / "bytes.jsonl", GOOD.encode() + b"\n" +
                  b'{"qid": "q2", "lang": "de", "text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: undecodable bytes"):
        read("jsonl", path, kind="queries")
    tsv = _write(tmp_path / "p.tsv", b"id\ttext\ttitle\n1\tok\tT\n2\t\xc3\x28\tT\n")
    with pytest.raises(DataError, match=r"p.tsv:3: undecodable bytes"):
        read("xor-tydi", _write(tmp_path / "q.jsonl", XOR_Q), passages=tsv)


def test_format_specific_defects(tmp_path):
    with pytest.raises(DataError, match=r"xor.jsonl:1: field 'question': missing field"):
        read("xor-tydi", _write(tmp_path / "xor.jsonl", '{"id": "1", "lang": "ja"}\n'))
    with pytest.raises(DataError, match=r"xor2.jsonl:1: field 'answers': wrong type"):
        read("xor-tydi", _write(tmp_path / "xor2.jsonl", '{"id": "1", "lang": "ja", '
                                '"question": "q", "answers": "Tokyo"}\n'))
    with pytest.raises(DataError, match=r"psg.tsv:2: expected 3 tab-separated columns"):
        read("xor-tydi", _write(tmp_path / "x.jsonl", XOR_Q),
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


def test_xor_query_langs_matching_no_query_is_an_error(tmp_path):
    """query_langs that select none of the file's queries (a config for other languages)
    is an error naming the setting and the languages the file has: the stage wrote no
    query at all before, without a word."""
    path = _write(tmp_path / "x.jsonl", "".join(
        json.dumps({"id": f"th{i}", "lang": "th", "question": "q", "answers": ["a"]}) + "\n"
        for i in range(3)))
    with pytest.raises(ConfigError, match=r"data.query_langs=\['ar', 'ja'\] \(--query-langs\)"
                                          r": no query of "
                                          r".*x.jsonl is in these languages \(it has th x 3\)"):
        readers.read_xor_queries(path, query_langs=["ar", "ja"])
    assert len(readers.read_xor_queries(path, query_langs=["th"])["queries"]) == 3


def test_mkqa_query_lang_no_record_has_is_an_error(tmp_path):
    """MKQA's Chinese is zh_cn / zh_hk / zh_tw: ``zh`` selected no query, silently."""
    rec = {"example_id": 1, "queries": {"en": "q", "zh_cn": "问"},
           "answers": {"en": [{"text": "a"}], "zh_cn": [{"text": "答"}]}}
    path = _write(tmp_path / "mkqa.jsonl", json.dumps(rec, ensure_ascii=False) + "\n")
    with pytest.raises(ConfigError, match=r"query_langs \(--query-langs\): zh is not a "
                                          r"language of .*mkqa.jsonl \(it has en, zh_cn\)"):
        readers.read_mkqa(path, ["en", "zh"])
    assert [q["qid"] for q in readers.read_mkqa(path, ["zh_cn"])["queries"]] == ["zh_cn:1"]


@pytest.mark.parametrize("kind, line, expected", [
    ("candidates", '{"qid": "q", "pids": ["a", "b", "c"], "scores": [1.0]}',
     r"field 'scores': 1 scores for 3 pids"),
    ("candidates", '{"qid": "q", "pids": ["a", "b", "a"]}', r"field 'pids': pid 'a' twice"),
    ("train", '{"qid": "q", "pos_pids": ["a"], "neg_pids": ["b", "a"]}',
     r"field 'neg_pids': pid 'a' is also a positive"),
    ("queries", '{"qid": "q", "lang": " en ", "text": "x"}',
     r"field 'lang': surrounding whitespace"),
])
def test_canonical_rows_whose_fields_disagree(tmp_path, kind, line, expected):
    """Canonical JSONL rows whose fields disagree are row defects naming file, line and
    field (a scores list shorter than its pids misaligned every teacher score after it)."""
    path = _write(tmp_path / "c.jsonl", line + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:1: " + expected):
        read("jsonl", path, kind=kind)


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


# Whole-file defects and duplicate ids, for every reader. Each reader below writes the file
# under test from a list of row ids (the other files it needs are valid); ``count`` is how many
# of those rows a prepared dataset holds (from the summary's row counts).
@dataclass
class Reader:
    write: Callable[[Path, list[str], bool], tuple[str, str, dict[str, Any], str]]
    count: Callable[[dict[str, int]], int]
    dup: str | None  # the duplicate's message for ids [k0, k1, k2, k0]; None: ids can't repeat
    header: int = 0  # lines before the first row
    lines: bool = True  # a line-based format (errors name lines)


def _gz(path: Path, text: str, gz: bool) -> str:
    if gz:
        return _write(path.with_name(path.name + ".gz"), gzip.compress(text.encode()))
    return _write(path, text)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _canonical(kind: str, row: Callable[[int, str], dict]):
    def write(tmp, ids, gz):
        path = _gz(tmp / f"{kind}.jsonl", _jsonl(row(i, k) for i, k in enumerate(ids)), gz)
        return "jsonl", path, {"kind": kind}, path
    return write


def _xor_queries(tmp, ids, gz):
    path = _gz(tmp / "xor.jsonl", _jsonl({"id": k, "lang": "ja", "question": f"Frage {i}?",
                                          "answers": [f"a{i}"]} for i, k in enumerate(ids)), gz)
    return "xor-tydi", path, {}, path


def _xor_passages(ext: str):
    def write(tmp, ids, gz):
        if ext == "tsv":
            text = "id\ttext\ttitle\n" + "".join(f"{k}\tPassage number {i}.\tT{i}\n"
                                                 for i, k in enumerate(ids))
        else:
            text = _jsonl({"id": k, "title": f"T{i}", "text": f"Passage number {i}."}
                          for i, k in enumerate(ids))
        path = _gz(tmp / f"psgs.{ext}", text, gz)
        return "xor-tydi", _write(tmp / "xor.jsonl", XOR_Q), {"passages": path}, path
    return write


def _mkqa(tmp, ids, gz):
    path = _gz(tmp / "mkqa.jsonl", _jsonl(
        {"example_id": k, "queries": {"de": f"Frage {i}?"}, "answers": {"de": [{"text": "a"}]}}
        for i, k in enumerate(ids)), gz)
    return "mkqa", path, {}, path


def _beir(part: str):
    def write(tmp, ids, gz):
        folder = tmp / "beir"
        rows = {"queries": _jsonl({"_id": f"q{i}", "text": f"Frage {i}?"} for i in range(4)),
                "corpus": _jsonl({"_id": "d0", "title": "", "text": "alpha"} for _ in [0]),
                "qrels": "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td0\t1\n"
                                                                  for i in range(4))}
        if part == "queries":
            rows[part] = _jsonl({"_id": k, "text": f"Frage {i}?"} for i, k in enumerate(ids))
        elif part == "corpus":
            rows[part] = _jsonl({"_id": k, "title": "", "text": f"Passage {i}."}
                                for i, k in enumerate(ids))
        else:
            rows[part] = "query-id\tcorpus-id\tscore\n" + "".join(f"{k}\td0\t1\n" for k in ids)
        paths = {p: _gz(folder / ("qrels/test.tsv" if p == "qrels" else f"{p}.jsonl"), text,
                        gz and p == part) for p, text in rows.items()}
        return "beir", str(folder), {}, paths[part]
    return write


def _passages(ext: str):
    def write(tmp, ids, gz):
        _, _, kw, path = _xor_passages(ext)(tmp, ids, gz)
        return "passages", path, {"lang": "en"}, path
    return write


def _dpr_record(i: int, k: str) -> dict:
    return {"id": k, "question": f"Frage {i}?", "answers": [f"a{i}"],
            "positive_ctxs": [{"title": "T", "text": f"Passage {i}.", "passage_id": f"p{i}"}],
            "hard_negative_ctxs": [{"title": "T", "text": "Other.", "passage_id": "n"}]}


def _dpr(ext: str):
    def write(tmp, ids, gz):
        recs = [_dpr_record(i, k) for i, k in enumerate(ids)]
        if ext == "json":  # one record per line: record i starts on line i + 1
            text = "[" + ",\n".join(json.dumps(r) for r in recs) + "]\n" if ids else ""
        else:
            text = _jsonl(recs)
        path = _gz(tmp / f"dpr.{ext}", text, gz)
        return "dpr", path, {"lang": "de"}, path
    return write


def _qas(tmp, ids, gz):
    path = _gz(tmp / "nq.qas.csv", "".join(f"Question {i} {k}?\t['a{i}']\n"
                                           for i, k in enumerate(ids)), gz)
    return "qas", path, {"lang": "en"}, path


def _qas_passages(tmp, ids, gz):
    _, _, kw, path = _xor_passages("tsv")(tmp, ids, gz)
    return ("qas", _write(tmp / "nq.qas.csv", "q\t['a']\n"),
            {**kw, "lang": "en", "corpus_langs": ["en"]}, path)


def _mkqa_mia(tmp, ids, gz):
    path = _gz(tmp / "mia" / "mkqa-de.jsonl", _jsonl(
        {"id": f"{k}_de", "lang": "de", "question": f"Frage {i}?", "answers": ["a"]}
        for i, k in enumerate(ids)), gz)
    return "mkqa", str(tmp / "mia"), {}, path


def _xquad(tmp, ids, gz):
    qas = [{"id": k, "question": f"Question {i}?"} for i, k in enumerate(ids)]
    doc = {"data": [{"title": "T", "paragraphs": [{"context": "Some text.", "qas": qas}]}]}
    path = _gz(tmp / "xq" / "xquad.en.json", json.dumps(doc, indent=1) if ids else "", gz)
    return "xquad", str(tmp / "xq"), {"query_langs": ["en"], "corpus_langs": ["en"]}, path


def _tatoeba(tmp, ids, gz):
    for side in ("deu", "eng"):
        path = _gz(tmp / "tt" / f"tatoeba.deu-eng.{side}",
                   "".join(f"{side} sentence {i} {k}\n" for i, k in enumerate(ids)), gz)
        if side == "deu":
            first = path
    return "tatoeba", str(tmp / "tt"), {"query_langs": ["deu"]}, first


def _n(*kinds):
    return lambda rows: sum(v for k, v in rows.items() if k.rsplit("/", 1)[-1] in kinds)


READERS = {
    "jsonl-queries": Reader(
        _canonical("queries", lambda i, k: {"qid": k, "lang": "de", "text": f"Frage {i}?"}),
        _n("queries"), r"queries.jsonl:4: field 'qid': duplicate id 'k0' \(first at line 1\)"),
    "jsonl-corpus": Reader(
        _canonical("corpus", lambda i, k: {"pid": k, "lang": "en", "text": f"Text {i}."}),
        _n("corpus"), r"corpus.jsonl:4: field 'pid': duplicate id 'k0' \(first at line 1\)"),
    "jsonl-qrels": Reader(
        _canonical("qrels", lambda i, k: {"qid": k, "pid": "p1", "rel": 1}),
        _n("qrels"), r"qrels.jsonl:4: duplicate \(qid, pid\) \('k0', 'p1'\) \(first at line 1\)"),
    "xor-tydi": Reader(
        _xor_queries, _n("queries"),
        r"xor.jsonl:4: field 'id': duplicate id 'k0' \(first at line 1\)"),
    "xor-tydi-passages-tsv": Reader(
        _xor_passages("tsv"), _n("corpus"),
        r"psgs.tsv:5: field 'id': duplicate passage id 'k0' \(first at line 2\)", header=1),
    "xor-tydi-passages-jsonl": Reader(
        _xor_passages("jsonl"), _n("corpus"),
        r"psgs.jsonl:4: field 'id': duplicate passage id 'k0' \(first at line 1\)"),
    "mkqa": Reader(
        _mkqa, _n("queries"),
        r"mkqa.jsonl:4: field 'example_id': duplicate example_id 'k0' \(first at line 1\)"),
    "mkqa-per-language": Reader(
        _mkqa_mia, _n("queries"),
        r"mkqa-de.jsonl:4: field 'id': duplicate example id 'k0' \(first at line 1\)"),
    "dpr-json": Reader(
        _dpr("json"), _n("queries"),
        r"dpr.json:4: field '\[3\]\.id': duplicate question id 'k0' \(first at line 1\)"),
    "dpr-jsonl": Reader(
        _dpr("jsonl"), _n("queries"),
        r"dpr.jsonl:4: field 'id': duplicate question id 'k0' \(first at line 1\)"),
    "qas": Reader(_qas, _n("queries"), None),  # qids are line numbers: never repeat
    "qas-passages": Reader(
        _qas_passages, _n("corpus"),
        r"psgs.tsv:5: field 'id': duplicate passage id 'k0' \(first at line 2\)", header=1),
    "passages-tsv": Reader(
        _passages("tsv"), _n("corpus"),
        r"psgs.tsv:5: field 'id': duplicate passage id 'k0' \(first at line 2\)", header=1),
    "passages-jsonl": Reader(
        _passages("jsonl"), _n("corpus"),
        r"psgs.jsonl:4: field 'id': duplicate passage id 'k0' \(first at line 1\)"),
    "beir-queries": Reader(
        _beir("queries"), _n("queries"),
        r"queries.jsonl:4: field '_id': duplicate query id 'k0' \(first at line 1\)"),
    "beir-corpus": Reader(
        _beir("corpus"), _n("corpus"),
        r"corpus.jsonl:4: field '_id': duplicate passage id 'k0' \(first at line 1\)"),
    "beir-qrels": Reader(
        _beir("qrels"), _n("qrels"), r"test.tsv:5: duplicate \(query-id, corpus-id\) "
                                     r"\('k0', 'd0'\) \(first at line 2\)", header=1),
    "xquad": Reader(
        _xquad, _n("queries"), r"xquad.en.json: field 'data\[0\]\.paragraphs\[0\]\.qas\[3\]\.id'"
                               r": duplicate question id 'k0' \(first at "
                               r"data\[0\]\.paragraphs\[0\]\.qas\[0\]\)", lines=False),
    "tatoeba": Reader(_tatoeba, _n("queries"), None),  # ids are line numbers: never repeat
}
DUP_IDS = ["k0", "k1", "k2", "k0"]


def _read(tmp, name, ids, gz=False, on_error="fail"):
    fmt, inp, kw, path = READERS[name].write(tmp, ids, gz)
    return path, (lambda: read(fmt, inp, rejects=readers.Rejects(on_error), **kw))


def test_every_format_is_covered(tmp_path):
    assert {r.write(tmp_path / n, ["k0"], False)[0] for n, r in READERS.items()} == set(FORMATS)


@pytest.mark.parametrize("name", [n for n, r in READERS.items() if r.dup])
def test_duplicate_id_fails_naming_file_lines_and_id(tmp_path, name):
    _, run = _read(tmp_path, name, DUP_IDS)
    with pytest.raises(DataError, match=READERS[name].dup):
        run()


@pytest.mark.parametrize("name", [n for n, r in READERS.items() if r.dup])
def test_duplicate_id_skipped_and_counted(tmp_path, name):
    fmt, inp, kw, path = READERS[name].write(tmp_path, DUP_IDS, False)
    out = str(tmp_path / "out")
    summary = prepare(fmt, inp, out, on_error="skip", **kw)
    rejected = [json.loads(x) for x in open(f"{out}/_rejected.jsonl", encoding="utf-8")]
    assert summary["rejected"] == len(rejected) == 1
    assert READERS[name].count(summary["rows"]) + len(rejected) == len(DUP_IDS)
    r = rejected[0]
    assert r["file"] == path and "duplicate" in r["reason"] and "'k0'" in r["reason"]
    assert r["line"] == (4 + READERS[name].header if READERS[name].lines else None)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("name", sorted(READERS))
def test_empty_file_is_an_error(tmp_path, name, on_error):
    path, run = _read(tmp_path, name, [], on_error=on_error)
    with pytest.raises(DataError, match=f"{re.escape(path)}: no rows"):
        run()


@pytest.mark.parametrize("name", sorted(READERS))
def test_blank_or_header_only_file_is_an_error(tmp_path, name):
    fmt, inp, kw, path = READERS[name].write(tmp_path, ["k0"], False)
    text = open(path, encoding="utf-8").read()
    keep = text.splitlines()[0] + "\n" if READERS[name].header else "\n\n"
    if fmt == "xquad":
        keep = '{"data": []}'
    _write(Path(path), keep)
    if fmt == "tatoeba":
        _write(Path(path).with_suffix(".eng"), keep)
    with pytest.raises(DataError, match=f"{re.escape(path)}: no rows"):
        read(fmt, inp, **kw)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("name", sorted(READERS))
def test_corrupt_gzip_names_the_file(tmp_path, name, on_error):
    fmt, inp, kw, path = READERS[name].write(tmp_path, ["k0"], True)
    _write(Path(path), b"these bytes are not gzip data " * 10)
    with pytest.raises(DataError, match=f"{re.escape(path)}: corrupt compressed data "
                                        r"\(BadGzipFile: Not a gzipped file"):
        read(fmt, inp, rejects=readers.Rejects(on_error), **kw)


@pytest.mark.parametrize("name", sorted(READERS))
def test_truncated_gzip_names_file_and_line(tmp_path, name):
    ids = [f"id-{i}-{(i * 7919) % 10007}" for i in range(3000)]
    fmt, inp, kw, path = READERS[name].write(tmp_path, ids, True)
    raw = open(path, "rb").read()
    _write(Path(path), raw[: len(raw) // 2])
    line = r" after line (\d+)" if READERS[name].lines else ""
    with pytest.raises(DataError, match=f"{re.escape(path)}: truncated compressed data{line} "
                                        r"\(EOFError: ") as e:
        read(fmt, inp, **kw)
    if READERS[name].lines:
        reached = int(re.search(r"after line (\d+)", str(e.value)).group(1))
        assert 0 < reached < len(ids)


def test_corrupt_gzip_stream(tmp_path):
    data = gzip.compress(_jsonl({"qid": f"q{i}", "lang": "de", "text": f"Frage {i} {i * i}?"}
                                for i in range(2000)).encode())
    path = _write(tmp_path / "q.jsonl.gz", data[:300] + bytes(64) + data[364:])
    with pytest.raises(DataError, match=r"q.jsonl.gz: corrupt compressed data( after line \d+)? "
                                        r"\(zlib.error: Error -3"):
        read("jsonl", path, kind="queries")


def test_missing_input_file(tmp_path):
    with pytest.raises(MissingInputError, match=f"{tmp_path}/nope.jsonl: input file not found"):
        read("jsonl", str(tmp_path / "nope.jsonl"), kind="queries")
    with pytest.raises(MissingInputError, match="no xquad.en.json"):
        read("xquad", str(tmp_path), query_langs=["en"], corpus_langs=["en"])


# DPR / Tevatron training data, passage collections as streams, XOR-TyDi and MKQA quirks.


def test_dpr_sample_against_the_raw_json():
    data = gzip.decompress(DPR.read_bytes())
    assert hashlib.sha256(data).hexdigest() == (
        "744f58983e41f68bd3ff364d7e633f1b77c6df97ff50d65100e56b4b2eb84afd"), "not upstream"
    raw = json.loads(data)
    t = read("dpr", str(DPR), lang="en")
    assert [q["qid"] for q in t["queries"]] == ["0", "1", "2", "3", "4"]
    assert [q["text"] for q in t["queries"]] == [r["question"] for r in raw]
    assert {q["lang"] for q in t["queries"]} == {"en"}
    assert [a["answers"] for a in t["answers"]] == [r["answers"] for r in raw]
    texts = {}
    for i, (r, ex) in enumerate(zip(raw, t["examples"], strict=True)):
        pos = list(dict.fromkeys(c["passage_id"] for c in r["positive_ctxs"]))
        assert ex == {"qid": str(i), "pos_pids": pos, "neg_pids": [
            p for p in dict.fromkeys(c["passage_id"] for c in r["hard_negative_ctxs"] +
                                     r["negative_ctxs"]) if p not in pos]}
        assert sorted(q["pid"] for q in t["qrels"] if q["qid"] == str(i)) == sorted(pos)
        for key in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
            texts.update({c["passage_id"]: (c["title"], c["text"]) for c in r[key]})
    # record 0: gold and BM25 copy of the same passage are one positive
    assert raw[0]["positive_ctxs"][0]["passage_id"] == raw[0]["positive_ctxs"][1]["passage_id"]
    assert len(t["examples"][0]["pos_pids"]) == len(raw[0]["positive_ctxs"]) - 1
    assert len(t["corpus"]) == len(texts) == 751
    assert {p["pid"]: (p["title"], p["text"]) for p in t["corpus"]} == {
        k: (a.strip(), b.strip()) for k, (a, b) in texts.items()}
    # XOR-TyDi style: questions in their language, passages in English
    xor = read("dpr", str(DPR), lang="ja", corpus_langs=["en"])
    assert {q["lang"] for q in xor["queries"]} == {"ja"}
    assert {p["lang"] for p in xor["corpus"]} == {"en"}
    # one language for all the passages: several would be read as the question's language
    with pytest.raises(ConfigError, match=r"corpus_langs=\['en', 'ja'\]: a DPR file"):
        read("dpr", str(DPR), lang="ja", corpus_langs=["en", "ja"])


def test_dpr_plain_json_tevatron_jsonl_and_prepare(tmp_path):
    raw = gzip.decompress(DPR.read_bytes())
    plain = _write(tmp_path / "nq-dev.json", json.dumps(json.loads(raw), indent=4))
    assert read("dpr", plain, lang="en") == read("dpr", str(DPR), lang="en")
    tev = _write(tmp_path / "train.jsonl", _jsonl([
        {"query_id": "q7", "query": "wer?", "answers": ["x"], "lang": " ar",
         "positive_passages": [{"docid": "d1", "title": "T", "text": "x y"}],
         "negative_passages": [{"docid": 2, "title": "", "text": "z"},
                               {"docid": "d1", "title": "T", "text": "x y"}]}]))
    t = read("dpr", tev)
    assert t["queries"] == [{"qid": "q7", "lang": "ar", "text": "wer?"}]
    assert t["examples"] == [{"qid": "q7", "pos_pids": ["d1"], "neg_pids": ["2"]}]
    out = str(tmp_path / "out")
    summary = prepare("dpr", str(DPR), out, lang="en", shard_rows=500)
    assert summary["rows"] == {"queries": 5, "answers": 5, "qrels": 18, "examples": 5,
                               "corpus": 751}
    back = storage.read_parquet(f"{out}/examples").to_pylist()
    assert back == read("dpr", str(DPR), lang="en")["examples"]


DPR_DEFECTS = {  # record -> (location, message) with the record at index 1, line 2
    "no_positive": ({"question": "q", "positive_ctxs": []},
                    r"\[1\]\.positive_ctxs': empty list"),
    "no_positive_key": ({"question": "q"}, r"\[1\]\.positive_ctxs': missing field"),
    "no_passage_id": ({"question": "q", "positive_ctxs": [{"title": "T", "text": "x"}]},
                      r"\[1\]\.positive_ctxs\[0\]\.passage_id': missing field"),
    "empty_text": ({"question": "q", "positive_ctxs": [{"psg_id": "9", "text": " "}]},
                   r"\[1\]\.positive_ctxs\[0\]\.text': empty text"),
    "ctx_not_object": ({"question": "q", "positive_ctxs": ["9"]},
                       r"\[1\]\.positive_ctxs\[0\]': wrong type: expected an object"),
    "question": ({"question": 5, "positive_ctxs": []},
                 r"\[1\]\.question': wrong type: expected string"),
    "answers": ({"question": "q", "answers": "x", "positive_ctxs": []},
                r"\[1\]\.answers': wrong type"),
    "clash": ({"question": "q", "positive_ctxs": [
        {"passage_id": "p0", "title": "T", "text": "Another text."}]},
        r"\[1\]\.passage_id': passage 'p0' has a different title or text than its first "
        r"copy \(at \[0\]\)"),
}


@pytest.mark.parametrize("defect", sorted(DPR_DEFECTS))
def test_dpr_defects_name_file_line_record_and_field(tmp_path, defect):
    record, pattern = DPR_DEFECTS[defect]
    good = [_dpr_record(0, "k0"), record, _dpr_record(2, "k2")]
    for r in good:
        r.pop("id", None)
    path = _write(tmp_path / "d.json", "[" + ",\n".join(json.dumps(r) for r in good) + "]")
    with pytest.raises(DataError, match=f"d.json:2: field '{pattern}"):
        read("dpr", path)
    rejects = readers.Rejects("skip")
    t = read("dpr", path, rejects=rejects)
    assert [q["qid"] for q in t["queries"]] == ["0", "2"]  # positions, not renumbered
    assert len(rejects.rows) == 1 and rejects.rows[0]["line"] == 2
    assert sorted(p["pid"] for p in t["corpus"]) == ["n", "p0", "p2"]


def test_dpr_whole_file_defects(tmp_path):
    cases = {
        '[{"question": "q", "positive_ctxs": [{"passage_id": "1", "text": "x"}]},\n{"q": ]':
            r"x.json:2: malformed JSON: Expecting value",
        '[{"question": "q", "positive_ctxs": [{"passage_id": "1", "text": "x"}]}\n{}]':
            r"x.json:2: malformed JSON: expected ',' or ']' between records",
        '[{"question": "q", "positive_ctxs": [{"passage_id": "1", "text": "x"}]}':
            r"x.json:1: malformed JSON: unexpected end of file",
        '[]': r"x.json: no rows \(an empty list\)",
        '{"question": "q"}': r"x.json:1: expected a JSON list of records \(DPR format\), got",
        '[{"question": "q", "positive_ctxs": [{"passage_id": "1", "text": "x"}]}] x':
            r"x.json:1: malformed JSON: extra data after the list",
    }
    for text, pattern in cases.items():
        with pytest.raises(DataError, match=pattern):
            read("dpr", _write(tmp_path / "x.json", text), rejects=readers.Rejects("skip"))
    rejects = readers.Rejects("skip")
    t = read("dpr", _write(tmp_path / "x.json", '[7, {"question": "q", "positive_ctxs": '
                                                '[{"passage_id": "1", "text": "x"}]}]'),
             rejects=rejects)
    assert [q["qid"] for q in t["queries"]] == ["1"]
    assert rejects.rows[0]["field"] == "[0]" and "got int" in rejects.rows[0]["reason"]


def test_json_list_is_streamed(tmp_path):
    import tracemalloc

    rec = {"question": "q" * 200, "positive_ctxs": [{"passage_id": "1", "text": "x" * 2000}]}
    path = tmp_path / "big.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[" + ",\n".join(json.dumps(rec) for _ in range(5000)) + "]")
    assert path.stat().st_size > 10_000_000
    tracemalloc.start()
    n = sum(1 for _ in readers.iter_json_list(str(path), readers.Rejects()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 5000 and peak < 2_000_000  # a few records, not the 10 MB document


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_passages_are_streamed(tmp_path, fmt):
    import tracemalloc

    path = tmp_path / f"psgs.{fmt}"
    with open(path, "w", encoding="utf-8") as f:
        if fmt == "tsv":
            f.write("id\ttext\ttitle\n")
            f.writelines(f'{i}\t"Passage ""{i}"" {"w " * 100}"\tT{i}\n' for i in range(40000))
        else:
            f.writelines(json.dumps({"id": str(i), "contents": f"T{i}\tPassage {'w ' * 100}"})
                         + "\n" for i in range(40000))
    assert path.stat().st_size > 8_000_000
    rows = readers.iter_passages(str(path), "en", unique=False)
    first = next(rows)
    assert first["pid"] == "0" and first["title"] == "T0"
    assert fmt == "jsonl" or first["text"].startswith('Passage "0" w')  # CSV quoting undone
    tracemalloc.start()
    n = 1 + sum(1 for _ in rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 40000 and peak < 1_000_000
    # prepare writes a collection shard by shard as it reads it
    out = str(tmp_path / "out")
    summary = prepare("passages", str(path), out, lang="en", shard_rows=15000)
    assert summary["rows"] == {"corpus": 40000}
    assert len(storage.list_files(f"{out}/corpus", ".parquet")) == 3


def test_passages_stream_until_a_defect(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"id": "1", "text": "a"}\n{"id": "2", "text": "b"}\n'
                                        '{"id": "3"}\n')
    rows = readers.iter_passages(path)
    assert [next(rows)["pid"], next(rows)["pid"]] == ["1", "2"]  # read before the bad line
    with pytest.raises(DataError, match=r"p.jsonl:3: field 'text': missing field"):
        next(rows)


def test_pyserini_passages():
    raw = [json.loads(x) for x in open(PYSERINI, encoding="utf-8")]
    t = read("passages", str(PYSERINI), lang="en")
    assert len(t["corpus"]) == len(raw) == 100
    for r, p in zip(raw, t["corpus"], strict=True):
        title, text = r["contents"].split("\t", 1)
        assert p == {"pid": r["id"], "lang": "en", "title": title, "text": text}
    assert t["corpus"][0]["title"] == "John Sawbridge"


def test_passage_json_variants(tmp_path):
    path = _write(tmp_path / "c.jsonl", _jsonl([
        {"id": "a", "contents": "no tab here"},
        {"_id": "b", "title": "", "text": "beir"},
        {"docid": "c", "title": "T", "text": "tevatron", "lang": " ko"},
        {"id": "d", "contents": "Title only\t  "}]))
    rejects = readers.Rejects("skip")
    rows = list(readers.iter_passages(path, "en", rejects))
    assert rows == [{"pid": "a", "lang": "en", "title": "", "text": "no tab here"},
                    {"pid": "b", "lang": "en", "title": "", "text": "beir"},
                    {"pid": "c", "lang": "ko", "title": "T", "text": "tevatron"}]
    assert rejects.rows[0]["line"] == 4 and rejects.rows[0]["field"] == "contents"


def test_xor_tydi_real_rows_strip_the_lang_space():
    path = XOR / "xor_train_retrieve_eng_span.sample.jsonl"
    raw = [json.loads(x) for x in open(path, encoding="utf-8")]
    assert sum(r["lang"] == " ar" for r in raw) == 3  # the upstream quirk is in the file
    t = read("xor-tydi", str(path))
    assert sorted({q["lang"] for q in t["queries"]}) == ["ar", "bn", "fi", "ja", "ko", "ru",
                                                         "te"]
    assert [q["qid"] for q in t["queries"]] == [r["id"] for r in raw]
    dev = read("xor-tydi", str(XOR / "xor_dev_retrieve_eng_span_v1_1.head10.jsonl"),
               passages=str(PYSERINI))
    assert len(dev["queries"]) == 10 and len(dev["corpus"]) == 100
    assert {p["lang"] for p in dev["corpus"]} == {"en"}


def _mia_rows(lang: str) -> list[dict]:
    return [json.loads(x) for x in open(MKQA_MIA / f"mkqa-{lang}.jsonl", encoding="utf-8")]


def test_mkqa_per_language_folder_and_zip(tmp_path):
    import zipfile

    t = read("mkqa", str(MKQA_MIA))
    en = {r["id"][:-3]: r for r in _mia_rows("en")}
    assert len(t["queries"]) == 24  # 8 examples x en, ja, zh_cn
    zh = [q for q in t["queries"] if q["lang"] == "zh_cn"]
    assert [q["qid"] for q in zh] == [f"zh_cn:{r['id'][:-6]}" for r in _mia_rows("zh_cn")]
    assert all(q["qid"].split(":", 1)[1] in en for q in t["queries"])  # one id per example
    ans = {a["qid"]: a["answers"] for a in t["answers"]}
    ja0 = _mia_rows("ja")[0]
    assert ans[f"ja:{ja0['id'][:-3]}"] == ja0["answers"]  # own language by default
    # English answers, joined on the id prefix even when the files' orders differ
    shuffled = tmp_path / "mia"
    for lang in ("en", "ja", "zh_cn"):
        rows = _mia_rows(lang)
        rows = rows[::-1] if lang == "en" else rows
        _write(shuffled / f"mkqa-{lang}.jsonl", _jsonl(rows))
    t = read("mkqa", str(shuffled), query_langs=["ja", "zh_cn"], answer_lang="en")
    for a in t["answers"]:
        assert a["answers"] == en[a["qid"].split(":", 1)[1]]["answers"]
    assert {q["lang"] for q in t["queries"]} == {"ja", "zh_cn"}
    # the zip as MIA ships it: members under a folder
    zpath = tmp_path / "mkqa_dev.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for lang in ("en", "ja", "zh_cn"):
            z.write(MKQA_MIA / f"mkqa-{lang}.jsonl", f"mkqa_dev/mkqa-{lang}.jsonl")
        z.writestr("mkqa_dev/mkqa-pt.jsonl", "")
    assert read("mkqa", str(zpath), query_langs=["en", "ja", "zh_cn"]) == read(
        "mkqa", str(MKQA_MIA))
    with pytest.raises(DataError, match=r"mkqa-pt.jsonl::.*mkqa_dev.zip: no rows \(empty "
                                        r"file\); leave language 'pt' out"):
        read("mkqa", str(zpath))
    with pytest.raises(MissingInputError, match=r"no mkqa-\{lang\}.jsonl for \['de'\]"):
        read("mkqa", str(zpath), query_langs=["de"])


def test_mkqa_per_language_defects(tmp_path):
    folder = tmp_path / "m"
    _write(folder / "mkqa-ja.jsonl", _jsonl([
        {"id": "1_ja", "lang": "ja", "question": "q1", "answers": ["a"]},
        {"id": "2_en", "lang": "ja", "question": "q2", "answers": ["a"]},
        {"id": "3_ja", "lang": "ko", "question": "q3", "answers": ["a"]},
        {"id": "4_ja", "lang": "ja", "question": "q4", "answers": []}]))
    _write(folder / "mkqa-en.jsonl", _jsonl([
        {"id": "1_en", "lang": "en", "question": "q1", "answers": ["A"]}]))
    with pytest.raises(DataError, match=r"mkqa-ja.jsonl:2: field 'id': '2_en' does not end "
                                        r"with '_ja'"):
        read("mkqa", str(folder))
    rejects = readers.Rejects("skip")
    t = read("mkqa", str(folder), query_langs=["ja"], answer_lang="en", rejects=rejects)
    assert t["answers"] == [{"qid": "ja:1", "answers": ["A"]}]
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(2, "id"), (3, "lang"),
                                                               (4, "id")]
    assert "has no 'en' row" in rejects.rows[2]["reason"]


def test_mkqa_answer_lang_from_the_config(tmp_path):
    """data.answer_lang reaches both MKQA readers: every question gets its example's answers
    in that language (English answers for an English corpus)."""
    from qgscale import storage
    from qgscale.config import DataConfig
    from qgscale.data.prepare import run_prepare

    records = [json.loads(x) for x in gzip.decompress(MKQA.read_bytes()).decode().splitlines()]
    en = {str(r["example_id"]): sorted({t for a in r["answers"]["en"]
                                        for t in [a.get("text"), *(a.get("aliases") or [])]
                                        if t}) for r in records}
    for input, langs in ((str(MKQA), ["ja", "de"]),
                         (str(TEST_DATA / "mkqa-mia" / "mkqa_dev"), ["ja", "zh_cn"])):
        out = str(tmp_path / langs[1])
        cfg = DataConfig(format="mkqa", input=input, query_langs=langs, answer_lang="en")
        run_prepare(cfg, out, "k")
        rows = storage.read_parquet(out + "/answers").to_pylist()
        assert len(rows) >= 10 and {r["qid"].split(":")[0] for r in rows} == set(langs)
        if input == str(MKQA):
            assert all(sorted(r["answers"]) == en[r["qid"].split(":", 1)[1]] for r in rows)
        else:
            en_rows = [json.loads(x) for x in (TEST_DATA / "mkqa-mia" / "mkqa_dev" /
                                              "mkqa-en.jsonl").read_text().splitlines()]
            by_id = {r["id"][: -len("_en")]: r["answers"] for r in en_rows}
            assert all(r["answers"] == by_id[r["qid"].split(":", 1)[1]] for r in rows)


# Row defects that were once read without a word: each is now reported with file, line and
# field (or, in skip mode, recorded), and no row is paired, split or typed wrongly.
MKQA_ANSWERS = {"de": [{"type": "entity", "text": "a", "aliases": ["b"]}]}
ROW_DEFECTS = {
    "canonical unknown field": (
        "jsonl", "c.jsonl", '{"pid": "p1", "lang": "en", "Title": "T", "text": "x"}\n',
        {"kind": "corpus"}, r"c.jsonl:1: field 'Title': unknown field for corpus rows"),
    "canonical score NaN": (
        "jsonl", "s.jsonl", '{"qid": "q", "pid": "p", "score": NaN, "ntok": 3}\n',
        {"kind": "scores"}, r"s.jsonl:1: field 'score': nan is not a finite float number"),
    "canonical score overflows": (
        "jsonl", "s.jsonl", '{"qid": "q", "pid": "p", "score": 1e400, "ntok": 3}\n',
        {"kind": "scores"}, r"s.jsonl:1: field 'score': inf is not a finite float number"),
    "canonical rel out of int32": (
        "jsonl", "r.jsonl", '{"qid": "q", "pid": "p", "rel": 3000000000}\n',
        {"kind": "qrels"}, r"r.jsonl:1: field 'rel': 3000000000 is out of range for int32"),
    "canonical empty pid in a list": (
        "jsonl", "c.jsonl", '{"qid": "q", "pids": ["p1", " "]}\n',
        {"kind": "candidates"}, r"c.jsonl:1: field 'pids': empty string at list position 1"),
    "canonical infinite candidate score": (
        "jsonl", "c.jsonl", '{"qid": "q", "pids": ["p1", "p2"], "scores": [1.0, -Infinity]}\n',
        {"kind": "candidates"}, r"c.jsonl:1: field 'scores': list position 1: -inf is not a "
        r"finite float number"),
    "mkqa answers missing": (
        "mkqa", "m.jsonl", '{"example_id": 1, "queries": {"de": "Wer?"}}\n', {},
        r"m.jsonl:1: field 'answers': missing field"),
    "mkqa answers of the language missing": (
        "mkqa", "m.jsonl", '{"example_id": 1, "queries": {"de": "Wer?"}, "answers": {"en": '
        '[{"text": "a"}]}}\n', {}, r"m.jsonl:1: field 'answers.de': missing field"),
    "mkqa answers mistyped": (
        "mkqa", "m.jsonl", '{"example_id": 1, "queries": {"de": "Wer?"}, "answers": {"de": '
        '"Paris"}}\n', {}, r"m.jsonl:1: field 'answers.de': wrong type"),
    "passage lang not a string": (
        "passages", "p.jsonl", '{"id": "p1", "text": "x", "lang": 7}\n', {},
        r"p.jsonl:1: field 'lang': wrong type: expected string, got int"),
    "dpr lang null": (
        "dpr", "d.jsonl", json.dumps({**_dpr_record(0, "q0"), "lang": None}) + "\n", {},
        r"d.jsonl:1: field 'lang': missing field"),
    "dpr positional id collides": (
        "dpr", "d.jsonl", json.dumps({**_dpr_record(0, "q0"), "id": "1"}) + "\n"
        + json.dumps({k: v for k, v in _dpr_record(1, "q1").items() if k != "id"}) + "\n", {},
        r"d.jsonl:2: field '\(position: no id field\)': duplicate question id '1'"),
    "tsv line of tabs": (
        "passages", "p.tsv", "id\ttext\ttitle\n1\tok\tT\n\t\t\n", {},
        r"p.tsv:3: field 'id': empty text"),
}


@pytest.mark.parametrize("defect", sorted(ROW_DEFECTS))
def test_row_defects_are_reported_not_defaulted(tmp_path, defect):
    fmt, name, text, kw, pattern = ROW_DEFECTS[defect]
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=pattern):
        t = read(fmt, path, **kw)
        list(t.get("corpus", []))  # a streamed collection is read when iterated


def test_mkqa_unanswerable_keeps_an_empty_answer_list(tmp_path):
    path = _write(tmp_path / "m.jsonl", json.dumps(
        {"example_id": 1, "queries": {"de": "Wer?", "en": "Who?"},
         "answers": {"de": [{"type": "unanswerable", "text": None}], "en": [
             {"type": "entity", "text": "Ann", "aliases": ["Anne", "Ann"]}]}}) + "\n")
    t = read("mkqa", path)
    assert t["answers"] == [{"qid": "de:1", "answers": []},
                            {"qid": "en:1", "answers": ["Ann", "Anne"]}]


def test_xquad_rejected_paragraph_takes_its_qrels_with_it(tmp_path):
    """Skip mode: a paragraph whose context is rejected has no passage, so no qrels pair may
    name it (every language's questions would point at it); the dropped pairs are recorded."""
    doc = {"data": [{"title": "T", "paragraphs": [
        {"context": "Berlin is big.", "qas": [{"id": "a", "question": "Big?"}]},
        {"context": "", "qas": [{"id": "b", "question": "Small?"}]}]}]}
    for lang in ("en", "de"):
        _write(tmp_path / f"xquad.{lang}.json", json.dumps(doc))
    rejects = readers.Rejects("skip")
    t = readers.read_xquad(str(tmp_path), ["en", "de"], ["en", "de"], test_mod=1,
                           rejects=rejects)
    pids = {r["pid"] for r in t["test/corpus"]}
    assert pids == {"en:0-0", "de:0-0"} and {r["pid"] for r in t["test/qrels"]} == pids
    assert len(t["test/qrels"]) == 4 and len(t["test/queries"]) == 4
    assert sorted(r["reason"] for r in rejects.rows if r["reason"].startswith("no passage")) \
        == ["no passage de:0-1: its 2 qrels pair(s) are left out",
            "no passage en:0-1: its 2 qrels pair(s) are left out"]


def test_xquad_missing_or_mistyped_structure(tmp_path):
    for i, (doc, field) in enumerate([
            ({"data": [{"title": "T"}]}, r"data\[0\].paragraphs': missing field"),
            ({"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]},
             r"data\[0\].paragraphs\[0\].qas': missing field"),
            ({"data": [{"title": "T", "paragraphs": ["c"]}]},
             r"data\[0\].paragraphs\[0\]': wrong type: expected an object, got str"),
            ({"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [7]}]}]},
             r"data\[0\].paragraphs\[0\].qas\[0\]': wrong type")]):
        folder = tmp_path / str(i)
        _write(folder / "xquad.en.json", json.dumps(doc))
        with pytest.raises(DataError, match=rf"xquad.en.json: field '{field}"):
            read("xquad", str(folder), query_langs=["en"], corpus_langs=["en"])


def test_tsv_header_after_a_byte_order_mark(tmp_path):
    path = _write(tmp_path / "p.tsv", "\ufeffid\ttitle\ttext\n1\tT\tone\n".encode())
    assert list(read("passages", path, lang="en")["corpus"]) == [
        {"pid": "1", "lang": "en", "title": "T", "text": "one"}]


def test_tatoeba_pairs_by_line_when_a_side_has_bad_bytes(tmp_path):
    folder = tmp_path / "tt"
    _write(folder / "tatoeba.deu-eng.deu", b"eins\n\xff zwei\ndrei\nvier\n")
    _write(folder / "tatoeba.deu-eng.eng", b"one\ntwo\n\xff three\nfour\n")
    rejects = readers.Rejects("skip")
    t = read("tatoeba", str(folder), query_langs=["deu"], rejects=rejects)
    pairs = {q["text"]: c["text"] for q, c in zip(t["queries"], t["corpus"], strict=True)}
    assert pairs == {"eins": "one", "vier": "four"}
    # each undecodable line, and the line it pairs with, is accounted for
    assert sorted((r["file"].rsplit(".", 1)[-1], r["line"]) for r in rejects.rows) == [
        ("deu", 2), ("deu", 3), ("eng", 2), ("eng", 3)]


def test_beir_query_judged_in_two_splits(tmp_path):
    b = tmp_path / "b"
    _write(b / "corpus.jsonl", '{"_id": "d1", "text": "alpha"}\n{"_id": "d2", "text": "b"}\n')
    _write(b / "queries.jsonl", '{"_id": "q1", "text": "a?"}\n')
    _write(b / "qrels" / "dev.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    _write(b / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    with pytest.raises(DataError, match=r"qrels/test.tsv:2: field 'query-id': query 'q1' is "
                                        r"judged in split 'dev' too \(.*qrels/dev.tsv:2\)"):
        read("beir", str(b))
    _write(b / "queries.jsonl", '{"_id": "q1", "text": "a?", "lang": null}\n')
    _write(b / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    b2 = tmp_path / "b2"
    for f in ("corpus.jsonl", "queries.jsonl", "qrels/dev.tsv"):
        _write(b2 / f, (b / f).read_text())
    with pytest.raises(DataError, match=r"queries.jsonl:1: field 'lang': missing field"):
        read("beir", str(b2))


def test_prepare_resumes_a_duplicate_drop_cut_short(tmp_path, monkeypatch):
    """A run that rewrote a shard without its duplicate and died before the shard's marker:
    the re-run marks it done and drops nothing more (it once dropped a good row there)."""
    rows = [f"p{i}\ttext {i}\tT\n" for i in range(6)]
    src = _write(tmp_path / "c.tsv", "".join(rows[:2] + ["p1\tcopy\tT\n"] + rows[2:]))
    out = str(tmp_path / "out")
    write = storage.ShardWriter.write

    def dies_after_the_shard(self, name, table, **extra):
        if "dropped" in extra:  # the rewrite without the duplicate lands, then the crash
            storage.write_parquet(self.shard_uri(name), table)
            raise KeyboardInterrupt
        return write(self, name, table, **extra)

    monkeypatch.setattr(storage.ShardWriter, "write", dies_after_the_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare("passages", src, out, shard_rows=2, on_error="skip")
    monkeypatch.setattr(storage.ShardWriter, "write", write)
    summary = prepare("passages", src, out, shard_rows=2, on_error="skip")
    assert storage.read_parquet(f"{out}/corpus").column("pid").to_pylist() == [
        f"p{i}" for i in range(6)]
    assert summary["rows"] == {"corpus": 6} and summary["rejected"] == 1


def test_prepare_again_on_other_input_starts_afresh(tmp_path):
    """The CLI names what it prepares (arguments and the input's fingerprint): a re-run after
    the input is mended rewrites the output, where it once kept the failed run's shards."""
    from typer.testing import CliRunner

    from qgscale import cli

    rows = [f"p{i}\ttext {i}\tT\n" for i in range(6)]
    src = tmp_path / "c.tsv"
    src.write_text("".join(rows[:3] + ["p1\tcopy\tT\n"] + rows[3:]))
    out = tmp_path / "out"
    args = ["data", "prepare", "--format", "passages", "--input", str(src), "--output", str(out),
            "--shard-rows", "2"]
    assert CliRunner().invoke(cli.app, args).exit_code == 2  # the duplicate
    src.write_text("".join(rows))
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    corpus = storage.read_parquet(str(out / "corpus"))
    assert corpus.column("pid").to_pylist() == [f"p{i}" for i in range(6)]
    assert len(storage.list_files(str(out / "corpus"), ".parquet")) == 3
    marker = str(out / "corpus" / "_done" / "part-00000-000000.json")
    started = storage.read_json(marker)["time"]
    assert CliRunner().invoke(cli.app, args).exit_code == 0  # the same again: resumed, kept
    assert storage.read_json(marker)["time"] == started


def test_canonical_jsonl_corpus_is_streamed(tmp_path):
    """``--format jsonl --kind corpus``: rows streamed (one line in memory); prepare writes
    them shard by shard and checks the pids after the rows (a duplicate names both lines)."""
    import tracemalloc

    path = tmp_path / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"pid": str(i), "lang": "en", "title": f"T{i}",
                                 "text": f"Passage {'w ' * 100}"}) + "\n" for i in range(40000))
    assert path.stat().st_size > 8_000_000
    rows = readers.iter_canonical_jsonl(str(path), "corpus", unique=False)
    tracemalloc.start()
    n = sum(1 for _ in rows)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 40000 and peak < 1_000_000
    out = str(tmp_path / "out")
    assert prepare("jsonl", str(path), out, kind="corpus", shard_rows=15000)["rows"] == {
        "corpus": 40000}
    assert len(storage.list_files(f"{out}/corpus", ".parquet")) == 3
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": "7", "lang": "en", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:40001: field 'pid': duplicate .*'7'.* "
                                        r"line 8"):
        prepare("jsonl", str(path), str(tmp_path / "out2"), kind="corpus", shard_rows=15000)


def test_rejects_past_the_held_rows_in_order_and_written_whole(tmp_path):
    """``Rejects(held=2)``: later rows wait in a local file; iterating (also between two
    ``add``s, or stopped early) gives every row in order; ``write`` gives them as JSONL, a
    lone surrogate from a JSON string written as its escape."""
    r = readers.Rejects("skip", held=2)
    for i in range(500):
        r.bad("f.jsonl", i + 1, "text", "empty", "x" * 100)
    assert len(r.rows) == 2 and r.spilled == 498 and r.count == 500 and r.files == {"f.jsonl"}
    assert any(x["line"] == 3 for x in r)  # stopped early: the file keeps its rows
    it = iter(r)
    head = [next(it)["line"] for _ in range(4)]
    r.bad("g.jsonl", 9, None, "malformed JSON", '"\ud800"')  # added while iterating
    assert head + [x["line"] for x in it] == [*range(1, 501), 9]
    r.write(str(tmp_path / "r.jsonl"))
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 501 and json.loads(lines[-1])["raw"] == '"\ud800"'
    assert [json.loads(x) for x in lines] == list(r)


# A lone surrogate escape ("\ud800") parses as JSON but no UTF-8 writes it: a row defect.
SURROGATE = "a\\ud800b"  # as written in the file: a JSON escape
LONE = {  # name -> (format, file name, text, read arguments, field)
    "passages": ("passages", "c.jsonl", f'{{"id": "1", "text": "{SURROGATE}"}}', {}, "text"),
    "passages-title": ("passages", "c.jsonl", f'{{"id": "1", "title": "{SURROGATE}", '
                       '"text": "x"}', {}, "title"),
    "passages-id": ("passages", "c.jsonl", f'{{"id": "{SURROGATE}", "text": "x"}}', {}, "id"),
    "jsonl-corpus": ("jsonl", "c.jsonl", f'{{"pid": "1", "lang": "en", "text": "{SURROGATE}"}}',
                     {"kind": "corpus"}, "text"),
    "jsonl-queries": ("jsonl", "q.jsonl", f'{{"qid": "1", "lang": "de", "text": "{SURROGATE}"}}',
                      {"kind": "queries"}, "text"),
    "jsonl-answers": ("jsonl", "a.jsonl", f'{{"qid": "1", "answers": ["x", "{SURROGATE}"]}}',
                      {"kind": "answers"}, "answers"),
    "xor-answers": ("xor-tydi", "x.jsonl", '{"id": "1", "lang": "ja", "question": "q", '
                    f'"answers": ["{SURROGATE}"]}}', {}, "answers"),
    "dpr-question": ("dpr", "d.jsonl", f'{{"question": "{SURROGATE}", "positive_ctxs": '
                     '[{"passage_id": "1", "text": "x"}]}', {}, "question"),
    "dpr-pid": ("dpr", "d.jsonl", '{"question": "q", "positive_ctxs": '
                f'[{{"passage_id": "{SURROGATE}", "text": "x"}}]}}', {},
                "positive_ctxs[0].passage_id"),
    "mkqa-alias": ("mkqa", "m.jsonl", '{"example_id": 1, "queries": {"de": "q"}, "answers": '
                   f'{{"de": [{{"text": "x", "aliases": ["{SURROGATE}"]}}]}}}}', {},
                   "answers.de[0].aliases"),
    "mkqa-lang-key": ("mkqa", "m.jsonl", f'{{"example_id": 1, "queries": {{"{SURROGATE}": '
                      '"q"}, "answers": {}}', {}, "queries"),
}


@pytest.mark.parametrize("name", sorted(LONE))
def test_lone_surrogate_is_a_row_defect(tmp_path, name):
    fmt, file, line, kw, fld = LONE[name]
    path = _write(tmp_path / file, line + "\n")
    with pytest.raises(DataError, match=f"{re.escape(path)}:1: field {re.escape(repr(fld))}: "
                                        r"invalid Unicode \(lone surrogate\)"):
        read(fmt, path, **kw)
    rejects = readers.Rejects("skip")
    read(fmt, path, rejects=rejects, **kw)
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(1, fld)]


def test_lone_surrogate_skipped_by_prepare(tmp_path):
    path = _write(tmp_path / "corpus.jsonl", f'{{"id": "1", "text": "{SURROGATE}"}}\n'
                                             '{"id": "2", "text": "fine"}\n')
    out = str(tmp_path / "out")
    summary = prepare("passages", path, out, on_error="skip")
    assert summary["rows"] == {"corpus": 1} and summary["rejected"] == 1
    (r,) = [json.loads(x) for x in open(f"{out}/_rejected.jsonl", encoding="utf-8")]
    assert (r["file"], r["line"], r["field"], r["reason"]) == (
        path, 1, "text", "invalid Unicode (lone surrogate)")
    assert "\\ud800" in r["raw"]  # written as its escape


def _xquad_doc(qas: list, title: object = "T") -> dict:
    return {"data": [{"title": title, "paragraphs": [{"context": "Berlin is big.",
                                                      "qas": qas}]}]}


def test_xquad_rejected_question_goes_from_every_language(tmp_path):
    """Skip mode: a question rejected in one file is left out of every language (reported
    in each, naming the defective file and place); the files stay parallel."""
    qas = [{"id": k, "question": f"Question {k}?"} for k in ("a", "b", "c")]
    en = _write(tmp_path / "xquad.en.json", json.dumps(_xquad_doc(
        [*qas[:2], {"id": None, "question": "Question c?"}])))
    de = _write(tmp_path / "xquad.de.json", json.dumps(_xquad_doc(
        [{"id": "a", "question": " "}, *qas[1:]])))
    rejects = readers.Rejects("skip")
    t = readers.read_xquad(str(tmp_path), ["de", "en"], ["de", "en"], test_mod=1,
                           rejects=rejects)
    assert [q["qid"] for q in t["test/queries"]] == ["de:b", "en:b"]
    assert {(r["qid"], r["pid"]) for r in t["test/qrels"]} == {
        (q, p) for q in ("de:b", "en:b") for p in ("de:0-0", "en:0-0")}
    q = "data[0].paragraphs[0].qas"
    got = sorted((r["file"], r["field"], r["reason"].split(" (")[0]) for r in rejects.rows)
    assert got == [
        (de, f"{q}[0].question", "empty text"),
        (de, f"{q}[2]", f"left out: {q}[2] was rejected in {en}"),
        (en, f"{q}[0]", f"left out: {q}[0] was rejected in {de}"),
        (en, f"{q}[2].id", "missing field")]
    # fail mode names the question; files that differ are still not parallel
    with pytest.raises(DataError, match=rf"xquad.en.json: field '{re.escape(q)}\[2\]\.id': "
                                        "missing field"):
        readers.read_xquad(str(tmp_path), ["en"], ["en"])
    _write(tmp_path / "xquad.de.json", json.dumps(_xquad_doc([*qas[:2], {"id": "x",
                                                                         "question": "?"}])))
    _write(tmp_path / "xquad.en.json", json.dumps(_xquad_doc(qas)))
    with pytest.raises(DataError, match=r"xquad.en.json: articles/paragraphs/question ids are "
                                        "not parallel"):
        readers.read_xquad(str(tmp_path), ["de", "en"], ["de", "en"], rejects=rejects)


def test_xquad_null_title_is_empty(tmp_path):
    path = _write(tmp_path / "xquad.en.json", json.dumps(_xquad_doc(
        [{"id": "a", "question": "Big?"}], title=None)))
    t = readers.read_xquad(str(tmp_path), ["en"], ["en"], test_mod=1)
    assert [p["title"] for p in t["test/corpus"]] == [""]  # not "None"
    _write(tmp_path / "xquad.en.json", json.dumps(_xquad_doc([{"id": "a", "question": "?"}],
                                                             title=7)))
    with pytest.raises(DataError, match=rf"{re.escape(path)}: field 'data\[0\]\.title': wrong "
                                        "type: expected string, got int"):
        readers.read_xquad(str(tmp_path), ["en"], ["en"])


@pytest.mark.parametrize("second", ["test.small.tsv", "test.tsv.gz"])
def test_beir_two_qrels_files_of_one_split(tmp_path, second):
    """Both would be split 'test': the second overwrote the first's qrels, silently."""
    b = tmp_path / "b"
    _write(b / "corpus.jsonl", '{"_id": "d1", "text": "alpha"}\n{"_id": "d2", "text": "b"}\n')
    _write(b / "queries.jsonl", '{"_id": "q1", "text": "a?"}\n{"_id": "q2", "text": "b?"}\n')
    _write(b / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    _gz(b / "qrels" / second.removesuffix(".gz"), "query-id\tcorpus-id\tscore\nq2\td2\t1\n",
        second.endswith(".gz"))
    first, then = sorted(["test.tsv", second])
    with pytest.raises(DataError, match=rf"qrels/{re.escape(then)}: a second qrels file of "
                                        rf"split 'test' \(the first: .*qrels/{re.escape(first)}"):
        read("beir", str(b), rejects=readers.Rejects("skip"))


@pytest.mark.parametrize("codec", ["bz2", "xz"])
@pytest.mark.parametrize("fmt,name", [("passages", "p.jsonl"), ("passages", "p.tsv"),
                                      ("dpr", "d.json"), ("jsonl", "q.jsonl")])
def test_corrupt_bz2_or_xz_names_the_file(tmp_path, codec, fmt, name):
    import bz2
    import lzma

    rows = [{"id": f"{i}", "qid": f"q{i}", "lang": "de", "text": f"Text {i} {i * i}."}
            for i in range(3000)]
    text = (json.dumps([{"question": "q", "positive_ctxs": [{"passage_id": "1", "text": "x"}]}])
            if fmt == "dpr" else "".join(f"{r['id']}\t{r['text']}\tT\n" for r in rows)
            if name.endswith(".tsv") else _jsonl({k: r[k] for k in ("qid", "lang", "text")}
                                                 if fmt == "jsonl" else r for r in rows))
    data = (bz2 if codec == "bz2" else lzma).compress(text.encode())
    kw = {"kind": "queries"} if fmt == "jsonl" else {}
    for bad in (b"not compressed data " * 10, data[: len(data) // 2] + bytes(200) +
                data[len(data) // 2 + 200:]):
        path = _write(tmp_path / f"{name}.{codec}", bad)
        with pytest.raises(DataError, match=rf"{re.escape(path)}: corrupt compressed data"):
            read(fmt, path, rejects=readers.Rejects("skip"), **kw)


def test_tsv_malformed_quoting_is_a_row_defect(tmp_path):
    """csv's non-strict mode rewrote these: '"Hello" world' -> 'Hello world', and an open
    quote took the tabs and fields after it into one field."""
    good = '1\t"Aaron ""A"" is"\tT\n2\tAaron ""A"" is\tT\n'  # psgs_w100's quoting; literal
    for bad, why in (('3\t"Hello" world\tT\n', r"'\\t' expected after '\"'"),
                     ('3\t"open\tx\tT\n', "unexpected end of data")):
        path = _write(tmp_path / "p.tsv", "id\ttext\ttitle\n" + good + bad)
        with pytest.raises(DataError, match=rf"p.tsv:4: malformed TSV line: {why}"):
            read("passages", path)
        rejects = readers.Rejects("skip")
        rows = read("passages", path, rejects=rejects)["corpus"]
        assert [r["text"] for r in rows] == ['Aaron "A" is', 'Aaron ""A"" is']
        assert [(r["line"], r["field"]) for r in rejects.rows] == [(4, None)]
    # an open quote no longer takes the next field in silently (2 columns: the counts match)
    path = _write(tmp_path / "two.tsv", 'id\ttext\n1\t"open\tx\n')
    with pytest.raises(DataError, match=r"two.tsv:2: malformed TSV line: unexpected end"):
        read("passages", path)


@pytest.mark.parametrize("header", ["docid\ttitle\ttext", "_id\ttext\ttitle", "pid\ttext",
                                    "doc_id\ttext\ttitle", "passage_id\ttitle\ttext",
                                    "id\ttext\ttitle"])
def test_tsv_header_names_and_a_header_again(tmp_path, header):
    names = header.split("\t")
    row = {"title": "T", "text": "Some text."}

    def line(pid: str) -> str:
        return "\t".join(pid if c == names[0] else row[c] for c in names) + "\n"

    path = _write(tmp_path / "p.tsv", f"{header}\n{line('1')}{line('2')}{header}\n{line('3')}")
    with pytest.raises(DataError, match=rf"p.tsv:4: a header line \({', '.join(names)}\) "
                                        r"inside the file \(files concatenated\?\)"):
        read("passages", path)
    rejects = readers.Rejects("skip")
    rows = read("passages", path, rejects=rejects)["corpus"]
    assert rows == [{"pid": k, "lang": "und", "title": "T" if "title" in names else "",
                     "text": "Some text."} for k in "123"]
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(4, None)]
    path = _write(tmp_path / "q.tsv", f"{header}\n{line('1')}{line('1')}")
    with pytest.raises(DataError, match=rf"q.tsv:3: field '{names[0]}': duplicate passage id"):
        read("passages", path)
    # a file without a header: a header line later is a defect too
    path = _write(tmp_path / "r.tsv", f"1\tText.\tT\n{header}\n2\tText.\tT\n")
    with pytest.raises(DataError, match=r"r.tsv:2: a header line"):
        read("passages", path)


def test_passage_jsonl_null_title_is_empty(tmp_path):
    """As the DPR, XQuAD and canonical readers: a null title is none, not a missing field."""
    path = _write(tmp_path / "c.jsonl", '{"id": "1", "title": null, "text": "x"}\n'
                                        '{"id": "2", "title": 7, "text": "y"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'title': wrong type"):
        read("passages", path)
    rows = read("passages", path, rejects=readers.Rejects("skip"))["corpus"]
    assert rows == [{"pid": "1", "lang": "und", "title": "", "text": "x"}]


@pytest.mark.parametrize("score", ["1_0", "\u0661", "+1", " 1", "1.0", "0x1", "2147483648"])
def test_qrels_score_is_ascii_digits(tmp_path, score):
    path = _write(tmp_path / "q.tsv", f"query-id\tcorpus-id\tscore\nq1\td1\t-1\nq2\td2\t{score}\n")
    why = ("2147483648 is out of range for int32" if score == "2147483648" else
           f"wrong type: expected an integer, got {score!r}")
    with pytest.raises(DataError, match=rf"q.tsv:3: field 'score': {re.escape(why)}"):
        readers.read_qrels_tsv(path)
    rows = readers.read_qrels_tsv(path, readers.Rejects("skip"))
    assert rows == [{"qid": "q1", "pid": "d1", "rel": -1}]


def test_duplicate_json_key_is_a_row_defect(tmp_path):
    """json keeps the last of two values silently: {"id": "1", "id": "2"} read as id 2."""
    path = _write(tmp_path / "c.jsonl", '{"id": "0", "text": "a"}\n'
                                        '{"id": "1", "text": "b", "id": "2"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'id': duplicate key in a JSON "
                                        r"object \(json keeps its last value only\)"):
        read("passages", path)
    path = _write(tmp_path / "q.jsonl", '{"qid": "1", "lang": "de", "text": "x", "text": "y"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'text': duplicate key"):
        read("jsonl", path, kind="queries")
    # DPR: a key twice in a context, in JSONL and in a JSON list (streamed: the record's end
    # is found; skip mode reads on)
    ctx = '{"passage_id": "1", "text": "x", "passage_id": "2"}'
    recs = [_dpr_record(0, "k0"), None, _dpr_record(2, "k2")]
    text = ",\n".join(json.dumps(r) if r else f'{{"question": "q", "positive_ctxs": [{ctx}]}}'
                      for r in recs)
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'passage_id': duplicate key"):
        read("dpr", _write(tmp_path / "d.jsonl", text.replace(",\n", "\n")))
    path = _write(tmp_path / "d.json", f"[{text}]")
    with pytest.raises(DataError, match=r"d.json:2: field '\[1\]\.passage_id': duplicate key"):
        read("dpr", path)
    rejects = readers.Rejects("skip")
    t = readers.read_dpr(path, rejects=rejects, corpus=False)
    assert [q["qid"] for q in t["queries"]] == ["k0", "k2"]
    assert [(r["line"], r["field"]) for r in rejects.rows] == [(2, "[1].passage_id")]
    # a chunk boundary inside the record with the key twice
    rejects = readers.Rejects("skip")
    rows = list(readers.iter_json_list(path, rejects, chunk=8))
    assert [i for _, i, _ in rows] == [0, 2] and rejects.count == 1


def test_json_documents_after_a_byte_order_mark(tmp_path):
    """JSONL and TSV drop a leading UTF-8 BOM; DPR's JSON list and XQuAD's JSON do too."""
    bom = "\ufeff"
    recs = [_dpr_record(0, "k0"), _dpr_record(1, "k1")]
    path = _write(tmp_path / "d.json", bom + "[" + ",\n".join(json.dumps(r) for r in recs) + "]")
    assert [q["qid"] for q in read("dpr", path)["queries"]] == ["k0", "k1"]
    path = _write(tmp_path / "d.json", bom + "[" + json.dumps(recs[0]) + ",\n{]")
    with pytest.raises(DataError, match=r"d.json:2: malformed JSON"):  # lines as counted
        read("dpr", path)
    _write(tmp_path / "xq" / "xquad.en.json", bom + json.dumps(_xquad_doc(
        [{"id": "a", "question": "Big?"}])))
    assert len(readers.read_xquad(str(tmp_path / "xq"), ["en"], ["en"], 1)["test/queries"]) == 1
    path = _write(tmp_path / "xq2" / "xquad.en.json", bom + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(path)}: no rows"):
        readers.read_xquad(str(tmp_path / "xq2"), ["en"], ["en"])


@pytest.mark.parametrize("codec", ["bz2", "xz"])
def test_dpr_jsonl_bz2_or_xz_is_jsonl(tmp_path, codec):
    """dpr_records took only .jsonl(.gz) for JSONL: .jsonl.bz2 was read as one JSON list."""
    import bz2
    import lzma

    data = _jsonl([_dpr_record(0, "k0"), _dpr_record(1, "k1")]).encode()
    path = _write(tmp_path / f"d.jsonl.{codec}", (bz2 if codec == "bz2" else lzma).compress(data))
    assert [q["qid"] for q in read("dpr", path)["queries"]] == ["k0", "k1"]
