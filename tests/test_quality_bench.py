"""benchmarks/quality.py: the statistics, and a ``--tiny`` run end to end (real Ray,
DeepSpeed and FAISS, tiny random models) on a copy of the session's tiny pipeline run (the
same config, so the shared stages are found done): every variant and seed distils from the
same warm-up weights, the JSON holds what the issue names, and a re-run reuses finished runs
and the shared rows."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from qgscale import storage
from tests.conftest import copy_run, load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_paired_differences_and_standard_error(quality):
    d = quality.paired([0.50, 0.70, 0.40], [0.45, 0.60, 0.41])
    assert d["per_seed"] == pytest.approx([0.05, 0.10, -0.01])
    assert d["mean"] == pytest.approx(0.14 / 3)
    std = math.sqrt(sum((x - 0.14 / 3) ** 2 for x in (0.05, 0.10, -0.01)) / 2)
    assert d["std"] == pytest.approx(std)
    assert d["se"] == pytest.approx(std / math.sqrt(3))
    assert d["t"] == pytest.approx(d["mean"] / d["se"])
    assert quality.stats([0.3])["std"] == 0.0
    assert quality.paired([0.2, 0.2], [0.1, 0.1])["t"] is None  # no spread: no ratio


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 6 Ray Train runs, 8 students evaluated (+ a re-run)
def test_tiny_run_writes_the_report(quality, tmp_path, tiny_run):
    from qgscale import config, pipeline
    from qgscale.layout import Layout

    cfg = config.load(copy_run(tiny_run[0], tmp_path))
    lay = Layout(cfg)
    root = tmp_path / "run"

    def started() -> dict[str, float]:
        return {s: pipeline.read_record(lay, s)["started"] for s in quality.SHARED}

    before = started()
    out = tmp_path / "quality.json"
    argv = ["--tiny", "--out", str(out), "--set", f"run.root={root}"]
    assert quality.main(argv) == 0
    res = json.loads(out.read_text())
    assert started() == before  # the shared stages of the same config were found done

    assert res["seeds"] == quality.TINY_SEEDS
    for key in ("zero_shot_mrr10", "warmup_mrr10", "teacher_rerank_mrr10", "bm25_mrr10"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["rerank"]["k"] == 10
    assert 0.0 <= res["rerank"]["student_mrr10_same_lists"] <= 1.0
    assert set(res["variants"]) == {"contrastive", "kd", "kd_align"}
    for name, v in res["variants"].items():
        for metric in ("mrr10_x_en", "align_acc1"):
            per_seed = v[metric]["per_seed"]
            assert len(per_seed) == 2 and all(0.0 <= x <= 1.0 for x in per_seed)
            assert v[metric]["mean"] == pytest.approx(np.mean(per_seed))
            assert v[metric]["std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert [r["seed"] for r in res["runs"][name]] == quality.TINY_SEEDS
    kd, con = res["variants"]["kd"]["mrr10_x_en"], res["variants"]["contrastive"]["mrr10_x_en"]
    diff = res["paired_differences"]["kd-contrastive"]["mrr10_x_en"]
    assert diff["per_seed"] == pytest.approx(np.subtract(kd["per_seed"], con["per_seed"]))
    assert res["steps"]["distill"] == quality.TINY["distill"]["max_steps"]
    assert res["seconds"] > 0

    # the loss weights of each variant, and every run starts from the one warm-up model
    loss = {n: rows[0]["loss"] for n, rows in res["runs"].items()}
    assert loss["contrastive"] == {"alpha": 0.0, "beta": 0.0}
    assert loss["kd"]["alpha"] > 0 and loss["kd"]["beta"] == 0.0
    assert loss["kd_align"]["alpha"] > 0 and loss["kd_align"]["beta"] > 0
    warmup = storage.join(str(root), "train", "warmup", "model")
    for name in quality.VARIANTS:
        for seed in quality.TINY_SEEDS:
            manifest = storage.read_manifest(str(root / "quality" / f"{name}-s{seed}"))
            assert manifest["inputs"]["init_uri"] == warmup
    # the seed reaches training: the two seeds' kd students differ
    blobs = [b"".join(p.read_bytes() for p in sorted(
        (root / "quality" / f"kd-s{seed}" / "model").rglob("*.safetensors")))
        for seed in quality.TINY_SEEDS]
    assert blobs[0] and blobs[0] != blobs[1]

    # a re-run reads the finished (variant, seed) runs back: same numbers, nothing retrained
    kept = [root / "quality" / "kd-s1" / "result.json", root / "quality" / "shared.json"]
    mtimes = [p.stat().st_mtime for p in kept]
    assert quality.main(argv) == 0
    again = json.loads(out.read_text())
    assert again["variants"] == res["variants"] and again["shared"] == res["shared"]
    assert [p.stat().st_mtime for p in kept] == mtimes

    # a run's inputs are in its key: rewritten teacher scores are a new key for every variant
    shard = storage.list_files(lay.scores, ".parquet")[0]
    keys = {n: quality.variant_key(cfg, n, 1) for n in quality.VARIANTS}
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert all(quality.variant_key(cfg, n, 1) != k for n, k in keys.items())
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a finished run of another key is not read back: it is retrained (only that one)
    row = json.loads(kept[0].read_text())
    kept[0].write_text(json.dumps(dict(row, key="from another warm-up")))
    assert quality.main(argv) == 0
    assert json.loads(kept[0].read_text())["key"] == row["key"]
    assert kept[0].stat().st_mtime > mtimes[0] and kept[1].stat().st_mtime == mtimes[1]
    assert json.loads(out.read_text())["variants"]["contrastive"] == res["variants"][
        "contrastive"]
