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
    res = CliRunner().invoke(cli.app, ["data", "prepare", "--format", "jsonl", "--kind",
                                       "queries", "--input", "x", "--output", str(tmp_path)])
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


@pytest.mark.parametrize("extra, expected", [
    (["--test-mod", "0"], "'--test-mod': Input should be greater than or equal to 1"),
    (["--shard-rows", "0"], "'--shard-rows': Input should be greater than or equal to 1"),
], ids=["test-mod", "shard-rows"])
def test_data_prepare_rejects_counts_below_one(tmp_path, extra, expected):
    args = ["data", "prepare", "--format", "xquad", "--input", str(tmp_path / "raw"),
            "--output", str(tmp_path / "out"), *extra]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 2 and expected in res.output, res.output


@pytest.mark.parametrize("args, message", [
    (["--config", "CFG", "--format", "xquad", "--test-mod", "3", "-s", "run.seed=1"],
     "--config takes every setting from the config's data section: leave out --format, "
     "--test-mod (or --config)"),
    (["--config", "CFG", "--output", "OUT", "--shard-rows", "10"],
     "--config takes every setting from the config's data section: leave out --output, "
     "--shard-rows (or --config)"),
    (["--format", "xquad", "--input", "IN", "--output", "OUT", "--passages", "p", "--lang",
      "de", "--kind", "queries"], "--format xquad does not use --passages, --kind, --lang"),
    (["--format", "jsonl", "--kind", "queries", "--input", "IN", "--output", "OUT",
      "--test-mod", "4", "--query-langs", "de"],
     "--format jsonl does not use --query-langs, --test-mod"),
    (["--format", "xor-tydi", "--input", "IN", "--output", "OUT", "--answer-lang", "en"],
     "--format xor-tydi does not use --answer-lang"),
    (["--format", "jsonl", "--kind", "queries", "--input", "IN", "--output", "OUT", "-s",
      "data.shard_rows=5"], "--set overrides a config: give it with --config"),
], ids=["config-format", "config-output", "xquad", "jsonl", "xor-tydi", "set-without-config"])
def test_data_prepare_ignored_options_are_errors(tmp_path, args, message):
    """Options that the chosen path would ignore: one line naming them; nothing is read or
    written (no Ray, no output folder)."""
    cfg = _config(tmp_path, {"run": {"root": str(tmp_path / "run")}})
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"qid": "a", "lang": "de", "text": "Frage?"}) + "\n")
    out = tmp_path / "out"
    subst = {"CFG": str(cfg), "IN": str(src), "OUT": str(out)}
    res = CliRunner().invoke(cli.app, ["data", "prepare", *(subst.get(a, a) for a in args)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"qgscale: error: {message}"
    assert not out.exists() and not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_run_from_with_only_is_an_error(tmp_path, dry_run):
    cfg = _config(tmp_path, {"run": {"root": str(tmp_path / "run")}})
    res = CliRunner().invoke(cli.app, ["run", str(cfg), "--from", "warmup", "--only", "eval",
                                       *dry_run])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == ("qgscale: error: --from warmup and --only eval: give one of "
                                  "them (--from runs a stage and every later one, --only that "
                                  "stage alone)")


def test_index_search_before_its_inputs(tmp_path):
    """``index search`` on a run without the student or its index: one line naming the
    missing path and the stage that writes it; a student or split no stage indexes is an
    error too. Nothing is loaded."""
    root = tmp_path / "run"
    for split in ("train", "test"):  # split data: one corpus per split
        (root / "data" / split / "corpus").mkdir(parents=True)
    cfg = _config(tmp_path, {"run": {"root": str(root)}})

    def search(*args: str) -> str:
        res = CliRunner().invoke(cli.app, ["index", "search", str(cfg), "--query", "q", *args])
        assert res.exit_code == 2, (res.output, res.exception)
        return res.stderr.strip().splitlines()[-1]

    how = "run `qgscale run CONFIG --only {0}` (or the whole pipeline) first"
    assert search() == (f"qgscale: error: index search: model {root}/train/warmup/model does "
                        "not exist; stage warmup writes it: " + how.format("warmup"))
    (root / "train" / "warmup" / "model").mkdir(parents=True)
    assert search() == (f"qgscale: error: index search: index {root}/index/warmup-train/faiss "
                        "does not exist; stage index writes it: " + how.format("index"))
    (root / "train" / "warmup" / "init").mkdir(parents=True)
    assert search("--model", "init", "--split", "test") == (
        f"qgscale: error: index search: index {root}/index/init-test/faiss does not exist; "
        "stage reindex writes it: " + how.format("reindex"))
    assert search("--model", "distill", "--split", "test") == (
        f"qgscale: error: index search: model {root}/train/distill/model does not exist; "
        "stage distill writes it: " + how.format("distill"))
    assert search("--model", "distill", "--split", "train") == (
        "qgscale: error: --model distill --split train: no stage builds that index (index: "
        "warmup on train; reindex: init, warmup, distill on eval.splits test)")
    res = CliRunner().invoke(cli.app, ["index", "search", str(cfg), "--query", "q", "--model",
                                       "bm25"])
    assert res.exit_code == 2 and "'--model'" in res.output and "'bm25'" in res.output


def test_a_failed_command_leaves_its_error_in_a_remote_run_roots_log(tmp_path, s3_bucket):
    """With an ``s3://`` run root the log is uploaded when a command ends, with the error it
    ended with (the console shows the one error line only)."""
    from qgscale import storage

    cfg = _config(tmp_path, {"run": {"name": "r", "root": f"{s3_bucket}/run"}})
    res = subprocess.run([sys.executable, "-m", "qgscale.cli", "run", str(cfg), "--only", "eval"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    _one_error_line(res, "stage eval needs stage prepare")
    (log,) = storage.list_files(f"{s3_bucket}/run/logs")
    text = storage.read_bytes(log).decode()
    assert "qgscale ERROR failed: stage eval needs stage prepare" in text
    assert "MissingInputError" in text  # its traceback, in the log only
