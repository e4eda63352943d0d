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
from qgscale.errors import DataError, MissingInputError

from .conftest import RESOURCES, TEST_DATA

MKQA = RESOURCES / "mkqa" / "test_mkqa.jsonl.gz"  # the upstream test fixture, byte for byte
TATOEBA = TEST_DATA / "tatoeba"  # deu-eng and tha-eng, plain text as upstream


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
