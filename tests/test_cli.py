"""User errors on the command line: one line ``qgscale: error: <message>`` on stderr, exit 2;
a bug keeps its traceback. Covers ``qgscale`` and ``python -m qgscale.eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qgscale import cli
from qgscale.errors import DataError, MissingInputError, one_line, user_error

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def _one_error_line(res, *expected: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr
    assert lines[-1].startswith("qgscale: error: "), res.stderr
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("argv", [["qgscale.cli", "config", "show"], ["qgscale.cli", "eval"],
                                  ["qgscale.eval", "--config"]],
                         ids=["config-show", "eval", "python-m-eval"])
def test_missing_config_file(tmp_path, argv):
    missing = tmp_path / "nope.yaml"
    res = _run("-m", *argv, str(missing))
    _one_error_line(res, f"{missing}: config file not found")
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["qgscale.cli", "config", "show"], ["qgscale.cli", "run"],
                                  ["qgscale.eval", "--config"]],
                         ids=["config-show", "run", "python-m-eval"])
def test_config_with_a_typo(tmp_path, argv):
    path = tmp_path / "c.yaml"
    path.write_text("index:\n  factoryy: Flat\n  nprobee: 3\n")
    res = _run("-m", *argv, str(path))
    line = _one_error_line(res, f"{path}: index.factoryy: Extra inputs are not permitted",
                           f"{path}: index.nprobee: Extra inputs are not permitted")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert line.count("; ") == 1  # both bad keys, on one line


def test_python_m_eval_without_an_index(tmp_path):
    root = tmp_path / "run"
    (root / "train" / "distill" / "model").mkdir(parents=True)
    cfg = _config(tmp_path, {"run": {"root": str(root)}})
    res = _run("-m", "qgscale.eval", "--config", str(cfg))
    _one_error_line(res, f"eval: index {root}/index/distill-all/faiss does not exist",
                    "eval.index or --index")
    res = _run("-m", "qgscale.eval", "--config", str(cfg), "eval.index=" + str(tmp_path / "ix"))
    _one_error_line(res, f"eval: index {tmp_path / 'ix'} does not exist")


def test_qgscale_eval_before_its_inputs(tmp_path):
    """``qgscale eval`` (the pipeline's eval stage) on a run whose upstream stages never ran:
    one line naming the stage to run first; Ray is not started."""
    root = tmp_path / "run"
    cfg = _config(tmp_path, {"run": {"root": str(root)}})
    res = CliRunner().invoke(cli.app, ["eval", str(cfg)])
    assert res.exit_code == 2, res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last == ("qgscale: error: stage eval needs stage prepare (missing); run `qgscale "
                    "run CONFIG --only prepare` (or the whole pipeline) first")


def test_python_m_eval_without_the_split_data(tmp_path):
    root = tmp_path / "run"
    (root / "train" / "distill" / "model").mkdir(parents=True)
    index = root / "index" / "distill-all" / "faiss"  # no split folders: one corpus
    index.mkdir(parents=True)
    (index / "_manifest.json").write_text("{}")
    cfg = _config(tmp_path, {"run": {"root": str(root)}})
    res = _run("-m", "qgscale.eval", "--config", str(cfg))
    _one_error_line(res, f"{root}/data: no queries for split 'test'", "eval.splits")


def test_data_prepare_errors_and_skip(tmp_path):
    rows = [{"qid": q, "lang": "de", "text": f"Frage {i}?"} for i, q in enumerate("abca")]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["data", "prepare", "--format", "jsonl", "--kind", "queries", "--input", str(src),
            "--output", str(out)]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"qgscale: error: {src}:4: field 'qid': duplicate id 'a' "
                                  "(first at line 1)")
    res = CliRunner().invoke(cli.app, args + ["--on-error", "skip"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["rows"] == {"queries": 3} and summary["rejected"] == 1
    assert "1 rows rejected" in res.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = CliRunner().invoke(cli.app, args[:-4] + ["--input", str(empty), "--output", str(out)])
    assert res.exit_code == 2  # after a line saying out (other input) was cleared
    assert res.stderr.strip().splitlines()[-1] == f"qgscale: error: {empty}: no rows (empty file)"
    res = CliRunner().invoke(cli.app, ["data", "prepare", "--format", "csv", "--input",
                                       str(src), "--output", str(out)])
    assert res.exit_code == 2 and res.stderr.startswith("qgscale: error: unknown format 'csv'")


def test_unknown_stage_is_a_usage_error(tmp_path):
    cfg = _config(tmp_path, {"run": {"root": str(tmp_path / "run")}})
    res = CliRunner().invoke(cli.app, ["run", str(cfg), "--only", "evall"])
    assert res.exit_code == 2 and "unknown stage 'evall'" in res.output


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from qgscale.data import prepare

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(prepare, "prepare", boom)
    res = CliRunner().invoke(cli.app, ["data", "prepare", "--format", "jsonl", "--input", "x",
                                       "--output", str(tmp_path)])
    assert isinstance(res.exception, RuntimeError) and res.exit_code == 1
    assert "qgscale: error" not in res.output


def test_user_error_inside_a_ray_task():
    """A DataError raised in a Ray task reaches the driver wrapped; it is still one line."""
    from ray.exceptions import RayTaskError

    cause = DataError("s3://b/q: row 3 (qid=x): empty field 'text'")
    wrapped = RayTaskError("evaluate_uris", "Traceback (most recent call last):\n  ...\n",
                           cause).as_instanceof_cause()
    assert user_error(wrapped) is cause
    assert one_line(user_error(wrapped)) == str(cause)
    try:
        try:
            raise MissingInputError("m: not found")
        except MissingInputError as e:
            raise RuntimeError("stage failed") from e
    except RuntimeError as outer:
        assert isinstance(user_error(outer), MissingInputError)
    assert user_error(RuntimeError("bug")) is None
    missing = FileNotFoundError(2, "No such file or directory", "/x/model")
    assert user_error(missing) is missing and one_line(missing) == "/x/model: No such file or " \
                                                                   "directory"
    try:  # a missing file behind another error is that error's business: a traceback
        raise OSError("s3://b/t: unreadable parquet shard") from missing
    except OSError as e:
        assert user_error(e) is None
