"""DPR-format training data in the pipeline: ``data.format: dpr`` with ``data.passages`` (the
collection the training file's passages come from, streamed as the corpus), as a user of
mDPR / NQ training files runs it: configs/xor-tydi.yaml with ``--set`` overrides, tiny models.

Data: the 5 real NQ-dev records of haystack's DPR sample (tests/data/dpr), 3 for training and
2 for eval; the collection is a psgs_w100-layout TSV of the records' own 751 passages."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qgscale import cli, config, pipeline, storage
from qgscale.data import readers
from qgscale.data.prepare import prepare, read
from qgscale.errors import DataError
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
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "text", "title"])
        w.writerows([pid, text, title] for pid, (title, text) in out.items())
    return out


def test_dpr_over_a_collection_streams_it_and_checks_every_passage(tmp_path):
    records = _records()
    coll = tmp_path / "psgs_w100.tsv"
    neg = str(records[2]["hard_negative_ctxs"][5]["passage_id"])
    pos = str(records[4]["positive_ctxs"][0]["passage_id"])
    assert not any(str(c["passage_id"]) == neg for k in CTXS for c in records[1][k])
    texts = collection(coll, records, drop={neg, pos})
    # streamed: the collection is a generator, read (and crossed off) before the other tables
    tables = read("dpr", str(DPR), passages=str(coll), lang="en", stream=True)
    assert list(tables)[0] == "corpus" and not isinstance(tables["corpus"], list)
    with pytest.raises(RuntimeError, match="read the corpus before"):
        next(iter(tables["queries"]))
    # fail: the first record in file order naming a passage the collection lacks
    with pytest.raises(DataError, match=rf"sample.json.gz:1: field '\[2\]\.hard_negative_ctxs"
                       rf"\[5\]\.passage_id': passage '{neg}' is not in the passage "
                       rf"collection {coll}"):
        read("dpr", str(DPR), passages=str(coll), lang="en")
    # skip: both records are rejected, their rows left out of every table
    rejects = readers.Rejects("skip")
    got = read("dpr", str(DPR), passages=str(coll), lang="en", corpus_langs=["en"],
               rejects=rejects)
    assert [(r["line"], r["field"]) for r in rejects.rows] == [
        (1, "[2].hard_negative_ctxs[5].passage_id"), (1, "[4].positive_ctxs[0].passage_id")]
    whole = read("dpr", str(DPR), lang="en")
    kept = {r["qid"] for r in whole["queries"]} - {"2", "4"}
    assert {r["qid"] for r in got["queries"]} == kept == {"0", "1", "3"}
    for kind in ("queries", "answers", "qrels", "examples"):
        assert got[kind] == [r for r in whole[kind] if r["qid"] in kept], kind
    # the corpus is the collection, row for row, whatever the inline copies hold
    assert [(r["pid"], r["title"], r["text"]) for r in got["corpus"]] == [
        (p, t, x) for p, (t, x) in texts.items()]
    assert {r["lang"] for r in got["corpus"]} == {"en"}
    # prepare writes the same, and its summary counts the two rejected records
    summary = prepare("dpr", str(DPR), str(tmp_path / "out"), passages=str(coll), lang="en",
                      on_error="skip", shard_rows=200)
    assert summary["rows"] == {"corpus": len(texts), "queries": 3, "answers": 3,
                               "qrels": len(got["qrels"]), "examples": 3}
    assert summary["rejected"] == 2
    assert storage.read_parquet(str(tmp_path / "out" / "examples")).to_pylist() == \
        got["examples"]
    # the CLI takes --passages with --format dpr, and its error names the record's field
    res = CliRunner().invoke(cli.app, [
        "data", "prepare", "--format", "dpr", "--input", str(DPR), "--passages", str(coll),
        "--lang", "en", "--output", str(tmp_path / "cli")])
    assert res.exit_code != 0 and "[2].hard_negative_ctxs[5].passage_id" in res.output


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
