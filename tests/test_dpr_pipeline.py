"""DPR-format training data in the pipeline: ``data.format: dpr`` with ``data.passages`` (the
collection the training file's passages come from, streamed as the corpus), as a user of
mDPR / NQ training files runs it: configs/xor-tydi.yaml with ``--set`` overrides, tiny models.

Data: the 5 real NQ-dev records of haystack's DPR sample (tests/data/dpr), 3 for training and
2 for eval; the collection is a psgs_w100-layout TSV of the records' own 751 passages."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qgscale import cli, config, pipeline, storage
from qgscale.data import readers
from qgscale.data.prepare import prepare, read
from qgscale.errors import ConfigError, DataError
from qgscale.layout import Layout
from tests.conftest import REPO, TEST_DATA
from tests.test_xor_mkqa import CPU, XOR_SET, merged, overrides

DPR = TEST_DATA / "dpr" / "sample.json.gz"
CTXS = ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs")


def _records() -> list[dict]:
    with gzip.open(DPR, "rt", encoding="utf-8") as f:
        return json.load(f)


def collection(path: Path, records: list[dict], drop: set[str] = frozenset(),
               retitle: str | None = None) -> dict[str, tuple[str, str]]:
    """Write the records' passages (first copy of each id, minus ``drop``) as DPR's
    ``psgs_w100.tsv`` (``id, text, title``); ``retitle``: that passage's title changed, to
    tell the collection's copy from the inline one. Returns pid -> (title, text)."""
    out: dict[str, tuple[str, str]] = {}
    for r in records:
        for k in CTXS:
            for c in r[k]:
                out.setdefault(str(c["passage_id"]), (c["title"], c["text"]))
    for pid in drop:
        out.pop(pid)
    if retitle:
        out[retitle] = ("Collection: " + out[retitle][0], out[retitle][1])
    _tsv(path, out)
    return out


def _tsv(path: Path, rows: dict[str, tuple[str, str]]) -> None:
    """``rows`` (pid -> (title, text)) as DPR's ``psgs_w100.tsv``."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        w.writerows([pid, text, title] for pid, (title, text) in rows.items())


def _only_in(records: list[dict], i: int, key: str) -> str:
    """The first passage id under ``records[i][key]`` that no other context names."""
    count: dict[str, int] = {}
    for r in records:
        for k in CTXS:
            for c in r[k]:
                count[str(c["passage_id"])] = count.get(str(c["passage_id"]), 0) + 1
    return next(str(c["passage_id"]) for c in records[i][key]
                if count[str(c["passage_id"])] == 1)


def test_dpr_over_a_collection_streams_it_and_checks_every_passage(tmp_path):
    records = _records()
    coll = tmp_path / "psgs_w100.tsv"
    neg = _only_in(records, 2, "hard_negative_ctxs")
    neg2 = _only_in(records, 2, "negative_ctxs")
    pos = _only_in(records, 4, "positive_ctxs")
    texts = collection(coll, records, drop={neg, neg2, pos})
    neg_at = next(j for j, c in enumerate(records[2]["hard_negative_ctxs"])
                  if str(c["passage_id"]) == neg)
    pos_at = next(j for j, c in enumerate(records[4]["positive_ctxs"])
                  if str(c["passage_id"]) == pos)
    en = {"passages": str(coll), "lang": "en", "corpus_langs": ["en"]}
    # streamed: the collection is a generator, read (and crossed off) before the other tables
    tables = read("dpr", str(DPR), **en, stream=True)
    assert list(tables)[0] == "corpus" and not isinstance(tables["corpus"], list)
    with pytest.raises(RuntimeError, match="read the corpus before"):
        next(iter(tables["queries"]))
    # fail: the first record in file order naming a passage the collection lacks, with totals
    with pytest.raises(DataError, match=(
            rf"sample.json.gz:1: field '\[2\]\.hard_negative_ctxs\[{neg_at}\]\.passage_id': "
            rf"2 negative passages \('{neg}', \.\.\.\) are not in the passage collection "
            rf"{coll} \(missing in all: 3 passages, named by 2 records\)$")):
        read("dpr", str(DPR), **en)
    # skip: the missing negatives leave their example; a missing positive, its record
    rejects = readers.Rejects("skip")
    got = read("dpr", str(DPR), **en, rejects=rejects)
    assert [(r["line"], r["field"], r["reason"].rsplit(": ", 1)[-1]) for r in rejects.rows] == [
        (1, f"[2].hard_negative_ctxs[{neg_at}].passage_id", "left out of the example"),
        (1, f"[4].positive_ctxs[{pos_at}].passage_id", "the record is left out")]
    whole = read("dpr", str(DPR), lang="en")
    for kind in ("queries", "answers", "qrels"):
        assert got[kind] == [r for r in whole[kind] if r["qid"] != "4"], kind
    fewer = {**whole["examples"][2], "neg_pids": [
        p for p in whole["examples"][2]["neg_pids"] if p not in (neg, neg2)]}
    assert got["examples"] == [*whole["examples"][:2], fewer, whole["examples"][3]]
    assert len(fewer["neg_pids"]) == len(whole["examples"][2]["neg_pids"]) - 2
    # the corpus is the collection, row for row
    assert [(r["pid"], r["title"], r["text"]) for r in got["corpus"]] == [
        (p, t, x) for p, (t, x) in texts.items()]
    assert {r["lang"] for r in got["corpus"]} == {"en"}
    # prepare writes the same, with the two rejects in _rejected.jsonl
    out = tmp_path / "out"
    summary = prepare("dpr", str(DPR), str(out), **en, on_error="skip", shard_rows=200)
    assert summary["rows"] == {"corpus": len(texts), "queries": 4, "answers": 4,
                               "qrels": len(got["qrels"]), "examples": 4}
    assert summary["rejected"] == 2
    assert storage.read_parquet(str(out / "examples")).to_pylist() == got["examples"]
    rejected = [json.loads(x) for x in (out / "_rejected.jsonl").read_text().splitlines()]
    assert [(r["file"], r["field"], r["reason"]) for r in rejected] == [
        (str(DPR), r["field"], r["reason"]) for r in rejects.rows]
    # resume after a crash that lost the last tables: the same rows and rejects again
    storage.remove(str(out / "examples"), recursive=True)
    storage.remove(str(out / "_manifest.json"))
    assert prepare("dpr", str(DPR), str(out), **en, on_error="skip",
                   shard_rows=200)["rows"] == summary["rows"]
    assert storage.read_parquet(str(out / "examples")).to_pylist() == got["examples"]
    assert [json.loads(x) for x in (out / "_rejected.jsonl").read_text().splitlines()] == \
        rejected
    # the CLI takes --passages with --format dpr (and the collection's language)
    args = ["data", "prepare", "--format", "dpr", "--input", str(DPR), "--passages",
            str(coll), "--lang", "en", "--output", str(tmp_path / "cli")]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code != 0 and "--corpus-langs" in res.output
    res = CliRunner().invoke(cli.app, [*args, "--corpus-langs", "en"])
    assert res.exit_code != 0 and f"[2].hard_negative_ctxs[{neg_at}]" in res.output


def test_dpr_jsonl_over_a_collection_ids_alone_copies_and_duplicates(tmp_path, caplog):
    """JSONL records (lines locate them), a context holding its id alone, inline copies
    that differ from the collection's, a passage twice in the collection."""
    records = _records()
    records[1]["negative_ctxs"][0] = {"passage_id": records[1]["negative_ctxs"][0][
        "passage_id"]}  # id alone
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    coll = tmp_path / "psgs.tsv"
    pos = _only_in(records, 3, "positive_ctxs")
    retitled = str(records[0]["positive_ctxs"][0]["passage_id"])
    texts = collection(coll, _records(), drop={pos}, retitle=retitled)
    en = {"passages": str(coll), "lang": "en", "corpus_langs": ["en"]}
    with pytest.raises(DataError, match=r"train.jsonl:4: field 'positive_ctxs\[\d+\]\."
                       rf"passage_id': positive passage '{pos}' is not in the passage"):
        read("dpr", str(path), **en)
    rejects = readers.Rejects("skip")
    with caplog.at_level("WARNING", logger="qgscale.data.readers"):
        got = read("dpr", str(path), **en, rejects=rejects)
    assert [r["qid"] for r in got["queries"]] == ["0", "1", "2", "4"]
    assert [(r["line"], r["reason"].endswith("the record is left out")) for r in rejects.rows
            ] == [(4, True)]
    # the inline copy that differs is counted and named; the collection's is the corpus
    assert re.search(r"1 of the 7\d\d passages compared \(those the file names with their "
                     r"text\) have another title or text", caplog.text)
    assert repr(retitled) in caplog.text and len(texts) == 750
    # without the collection an id alone is a defect (the corpus needs its text)
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'negative_ctxs\[0\]\.text'"):
        read("dpr", str(path), lang="en")
    # a collection whose passages miss every positive leaves no record: an error
    other = tmp_path / "other.tsv"
    other.write_text("id\ttext\ttitle\nx1\tsome text\tT\n", encoding="utf-8")
    with pytest.raises(DataError, match="no record left: each names a positive passage not "
                       "in the passage collection"):
        read("dpr", str(path), passages=str(other), lang="en", corpus_langs=["en"],
             rejects=readers.Rejects("skip"))
    # a passage twice in the collection: an error naming both lines; skip keeps the first
    twice = tmp_path / "twice.tsv"
    lines = coll.read_text(encoding="utf-8").splitlines(keepends=True)
    twice.write_text("".join(lines) + lines[1], encoding="utf-8")
    dup = lines[1].split("\t")[0]
    with pytest.raises(DataError, match=rf"twice.tsv:{len(lines) + 1}: field 'id': duplicate "
                       rf"passage id '{dup}' \(first at line 2\)"):
        prepare("dpr", str(path), str(tmp_path / "out-fail"), passages=str(twice), lang="en",
                corpus_langs=["en"])
    summary = prepare("dpr", str(path), str(tmp_path / "out"), passages=str(twice), lang="en",
                      corpus_langs=["en"], on_error="skip")
    assert summary["rows"]["corpus"] == len(texts) and summary["rejected"] == 2


@pytest.mark.slow
def test_pipeline_trains_on_dpr_data_over_a_collection(tmp_path, ray_local):
    records = _records()
    train, dev = tmp_path / "train.json", tmp_path / "dev.json"
    train.write_text(json.dumps(records[:3]), encoding="utf-8")
    dev.write_text(json.dumps(records[3:]), encoding="utf-8")
    coll = tmp_path / "psgs_w100.tsv"
    retitled = str(records[0]["positive_ctxs"][0]["passage_id"])
    texts = collection(coll, records, retitle=retitled)
    root = tmp_path / "run"
    assert prepare("dpr", str(dev), str(tmp_path / "data-dev"), lang="en")["rows"][
        "queries"] == 2
    sets = overrides(merged(CPU, XOR_SET, {
        "run": {"root": str(root)},
        "data": {"format": "dpr", "input": str(train), "passages": str(coll),
                 "query_langs": None, "lang": "en", "shard_rows": 200},
        "eval": {"data": str(tmp_path / "data-dev")},
        "teacher": {"generate": {"langs": ["de"]}},  # alignment: queries in another language
        **{s: {"batch_size": 2} for s in ("warmup", "distill", "qg_rank")}}))  # 3 queries
    cfg = config.load(REPO / "configs" / "xor-tydi.yaml", sets)
    results = pipeline.run(cfg)
    assert list(results) == pipeline.STAGE_NAMES
    lay = Layout(cfg)

    # prepare: the corpus is the collection (4 shards), with its own copy of a passage
    corpus = storage.read_parquet(lay.data("train", "corpus")).to_pylist()
    assert len(storage.list_files(lay.data("train", "corpus"), ".parquet")) == 4
    assert {r["pid"]: (r["title"], r["text"]) for r in corpus} == texts
    assert texts[retitled][0].startswith("Collection: ")
    examples = read("dpr", str(train), lang="en")["examples"]
    assert storage.read_parquet(lay.train("examples")).to_pylist() == examples
    # the file's own positives: no bm25 stage; the warm-up reads its examples (hard negatives)
    assert "training data's own positives" in results["bm25"]["skipped"]
    warm = storage.read_manifest(lay.train_dir("warmup"))
    assert warm["inputs"]["examples_uri"] == lay.data("train", "examples")
    assert warm["counts"]["rows"] == 3
    assert storage.read_parquet(lay.candidates).num_rows == 3  # mine: every training query
    # eval on the 2 held-out records: MRR on their qrels, R@kt on their answers
    got = storage.read_json(storage.join(lay.eval_dir("distill"), "test", "metrics.json"))
    assert got["n_queries"] == 2 and got["query_langs"]["en"]["n"] == 2
    assert got["query_langs"]["en"]["n_kt"] == 2 and {"mrr@10", "r@2kt"} <= set(
        got["query_langs"]["en"])
    assert [s.state for s in pipeline.plan(cfg)] == ["done"] * len(pipeline.STAGE_NAMES)


def test_dpr_prepare_benchmark_runs(tmp_path):
    """benchmarks/dpr_prepare.py at a tiny size: every phase prepares the rows it should."""
    import subprocess
    import sys

    out = tmp_path / "b.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "dpr_prepare.py"), "--sizes",
                    "400", "2000", "--queries", "10", "--negatives", "3", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True)
    got = json.loads(out.read_text())
    assert [(r["mode"], r["collection"], r["rows"]["corpus"]) for r in got["runs"]] == [
        ("inline", None, 40), ("passages", 400, 400), ("collection", 400, 400),
        ("passages", 2000, 2000), ("collection", 2000, 2000)]
    assert all(r["rows"].get("examples", 10) == 10 and r["driver_peak_rss_mb"] > 0
               for r in got["runs"])
    assert set(got["dpr_over_collection_vs_alone_mb"]) == {"400", "2000"}


def test_dpr_inline_passages_stream_from_a_second_read(tmp_path):
    """Without a collection the corpus is the inline passages, each at its first copy, read
    from the file a second time (not held); a file changed between the reads is an error."""
    records = _records()
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tables = read("dpr", str(path), lang="en", stream=True)
    assert not isinstance(tables["corpus"], list) and isinstance(tables["queries"], list)
    rows = list(tables["corpus"])
    first: dict[str, tuple[str, str]] = {}
    for r in records:  # file order: positives, then hard negatives, then negatives
        for k in CTXS:
            for c in r[k]:
                first.setdefault(str(c["passage_id"]), (c["title"].strip(), c["text"].strip()))
    assert [(r["pid"], r["title"], r["text"]) for r in rows] == [
        (p, t, x) for p, (t, x) in first.items()]
    assert len(rows) == 751 and {r["lang"] for r in rows} == {"en"}
    # the file changed after the first read: a passage of it is not found again
    tables = read("dpr", str(path), lang="en", stream=True)
    records[4]["positive_ctxs"] = records[4]["positive_ctxs"][:1]
    gone = {str(c["passage_id"]) for c in _records()[4]["positive_ctxs"]} - {
        str(c["passage_id"]) for r in records for k in CTXS for c in r[k]}
    assert gone
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{len(gone)} passages of the first read not found "
                       "again .*did the file change"):
        list(tables["corpus"])


def test_dpr_collection_copies_spacing_other_texts_tevatron_and_checks_first(tmp_path,
                                                                              caplog):
    records = _records()
    texts = collection(tmp_path / "c.tsv", records)
    en = {"lang": "en", "corpus_langs": ["en"]}
    # other spacing inside a text is the same passage: no warning
    spaced = tmp_path / "spaced.tsv"
    _tsv(spaced, {p: (t, " " + x.replace(" ", "   ") + "  ") for p, (t, x) in texts.items()})
    with caplog.at_level("WARNING", logger="qgscale.data.readers"):
        read("dpr", str(DPR), passages=str(spaced), **en)
    assert "another title or text" not in caplog.text
    # most copies differ: the wrong collection, an error (a warning with skip)
    other = tmp_path / "other.tsv"
    _tsv(other, {p: ("Other " + t, x) for p, (t, x) in texts.items()})
    with pytest.raises(DataError, match=rf"751 of the 751 passages compared .* have another "
                       rf"title or text in the collection {other} .*is it the collection"):
        read("dpr", str(DPR), passages=str(other), **en)
    with caplog.at_level("WARNING", logger="qgscale.data.readers"):
        got = read("dpr", str(DPR), passages=str(other), **en, rejects=readers.Rejects("skip"))
    assert "751 of the 751 passages compared" in caplog.text and len(got["examples"]) == 5
    # a record with a missing positive and missing negatives: reported once, for the positive
    pos, neg = _only_in(records, 1, "positive_ctxs"), _only_in(records, 1, "negative_ctxs")
    part = tmp_path / "part.tsv"
    _tsv(part, {p: v for p, v in texts.items() if p not in (pos, neg)})
    rejects = readers.Rejects("skip")
    got = read("dpr", str(DPR), passages=str(part), **en, rejects=rejects)
    assert [r["field"][:18] for r in rejects.rows] == ["[1].positive_ctxs["]
    assert "positive passage" in rejects.rows[0]["reason"] and "1" not in {
        r["qid"] for r in got["queries"]}
    # Tevatron records (query_id, docid contexts) over the collection
    tev = tmp_path / "tev.jsonl"
    tev.write_text("".join(json.dumps({
        "query_id": f"t{i}", "query": r["question"],
        "positive_passages": [{"docid": str(c["passage_id"]), "title": c["title"],
                               "text": c["text"]} for c in r["positive_ctxs"]],
        "negative_passages": [{"docid": str(c["passage_id"])} for c in r["hard_negative_ctxs"]],
    }) + "\n" for i, r in enumerate(records)), encoding="utf-8")
    got = read("dpr", str(tev), passages=str(part), **en, rejects=readers.Rejects("skip"))
    assert [r["qid"] for r in got["queries"]] == ["t0", "t2", "t3", "t4"]
    # a format argument no reader could use fails before the output of another prepare is
    # cleared
    out = tmp_path / "out"
    prepare("dpr", str(DPR), str(out), **en)
    with pytest.raises(ConfigError, match="give the collection's language"):
        prepare("dpr", str(DPR), str(out), passages=str(part), lang="en")
    assert storage.read_parquet(str(out / "examples")).num_rows == 5


def test_dpr_over_a_collection_in_byte_ranges_as_in_one_stream(tmp_path, monkeypatch, caplog):
    """``prepare`` reads the collection in byte ranges (``qgscale.data.collection``) and crosses
    off the named passages in its id check: the tables, rejected rows, warning and errors of
    one stream (``read``; the collection has no duplicate id, which ``read`` reports in file
    order among the row defects), whether passages are missing, retitled or all other. A
    plan of the same output made without the DPR file is not reused."""
    from qgscale.data import collection as units

    monkeypatch.setattr(units, "UNIT_BYTES", 40_000)
    monkeypatch.setattr(units, "MIN_UNIT_BYTES", 40_000)
    records = _records()
    neg, pos = _only_in(records, 2, "hard_negative_ctxs"), _only_in(records, 4, "positive_ctxs")
    retitled = _only_in(records, 3, "negative_ctxs")
    coll = tmp_path / "psgs_w100.tsv"
    texts = collection(coll, records, drop={neg, pos}, retitle=retitled)
    en = {"passages": str(coll), "lang": "en", "corpus_langs": ["en"]}
    rejects = readers.Rejects("skip")
    with caplog.at_level("WARNING", logger="qgscale.data.readers"):
        want = read("dpr", str(DPR), **en, rejects=rejects)
    warning = caplog.text
    caplog.clear()
    assert "1 of the 749 passages compared" in warning
    out = tmp_path / "out"
    prepare("passages", str(coll), str(out), lang="en", shard_rows=50)  # no named passages
    with caplog.at_level("WARNING", logger="qgscale.data.readers"):
        prepare("dpr", str(DPR), str(out), **en, on_error="skip", shard_rows=50)
    assert caplog.text.split("WARNING", 1)[-1].strip() in warning
    assert len(storage.read_json(str(out / "_collection" / "_plan.json"))["units"]) > 3
    for kind in ("corpus", "queries", "answers", "qrels", "examples"):
        assert storage.read_parquet(str(out / kind)).to_pylist() == want[kind], kind
    rejected = [json.loads(x) for x in (out / "_rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"], r["reason"]) for r in rejected] == [
        (r["line"], r["field"], r["reason"]) for r in rejects.rows] and len(rejected) == 2
    assert len(want["corpus"]) == len(texts)
    with pytest.raises(DataError) as stream:  # fail: the first record naming a missing one
        read("dpr", str(DPR), **en)
    with pytest.raises(DataError) as ranges:
        prepare("dpr", str(DPR), str(tmp_path / "fail"), **en, shard_rows=50)
    assert str(ranges.value) == str(stream.value)
    other = tmp_path / "other.tsv"  # every copy differs: the wrong collection
    _tsv(other, {p: ("Other " + t, x) for p, (t, x) in texts.items()})
    en["passages"] = str(other)
    with pytest.raises(DataError) as stream:
        read("dpr", str(DPR), **en)
    with pytest.raises(DataError) as ranges:
        prepare("dpr", str(DPR), str(tmp_path / "other"), **en, shard_rows=50)
    assert str(ranges.value) == str(stream.value) and "is it the collection" in str(stream.value)
