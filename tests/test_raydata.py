"""Ray Data reads the produced parquet locally and from the S3 endpoint; CLI prepare."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qgscale import storage
from qgscale.data import readers
from qgscale.data.prepare import prepare


@pytest.fixture(params=["local", "s3"])
def prepared(request, tmp_path):
    root = str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket")
    out = storage.join(root, "xq")
    prepare("xquad", readers.bundled("xquad"), out, query_langs=["de", "zh"],
            corpus_langs=["en"], shard_rows=400)
    return out


def test_ray_data_reads_shards(ray_local, prepared):
    import ray

    uri = storage.join(prepared, "train", "queries")
    ds = ray.data.read_parquet(storage.ray_path(uri), filesystem=storage.pyarrow_filesystem(uri))
    rows = ds.take_all()
    expected = storage.read_parquet(uri).to_pylist()
    assert len(rows) == len(expected) > 1000
    assert sorted(r["qid"] for r in rows) == sorted(r["qid"] for r in expected)
    assert {r["lang"] for r in rows} == {"de", "zh"}


def test_cli_prepare_local_and_s3(s3_bucket, tmp_path):
    env = dict(os.environ)
    for out in (str(tmp_path / "bench"), storage.join(s3_bucket, "bench")):
        res = subprocess.run(
            [sys.executable, "-m", "qgscale.cli", "data", "prepare", "--format", "xquad",
             "--input", readers.bundled("xquad"), "--output", out, "--query-langs", "de,ru",
             "--corpus-langs", "en"], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        m = storage.read_manifest(out)
        assert m["rows"]["train/queries"] + m["rows"]["test/queries"] == 2 * 1190
        assert m["rows"]["train/corpus"] + m["rows"]["test/corpus"] == 240
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": "q", "lang": "de"}\n')
    res = subprocess.run([sys.executable, "-m", "qgscale.cli", "data", "prepare", "--format",
                          "jsonl", "--kind", "queries", "--input", str(bad), "--output",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2 and "bad.jsonl:1: field 'text': missing field" in res.stderr
