"""benchmarks/gpu_check.py runs end to end on CPU with --tiny (the GPU run is the same script)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_tiny(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny",
                    "--out", str(tmp_path)], check=True, timeout=300)
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["device"] == "cpu"
    ts = out["teacher_scoring"]
    assert "error" not in ts
    for key in ("naive_pairs_per_s", "fast_pairs_per_s", "speedup", "tflops",
                "bf16_spearman_min", "peak_mem_gb"):
        assert key in ts
    # the fast path computes the naive loop's scores (fp32 on CPU: exact up to rounding)
    assert ts["max_abs_diff_fast_vs_naive_fp32"] < 1e-4
    assert ts["bf16_spearman_min"] > 0.999  # CPU: both runs are fp32
    assert ts["pairs_per_passage"] > 1.5  # candidate lists share passages
    assert ts["tflops"] > 0 and ts["fast_pairs_per_s"] > 0
    assert out["student_step"]["samples_per_s"] > 0
    assert out["encode"]["passages_per_s"] > 0
    assert out["generate"]["queries_per_s_beam1"] > 0
    assert out["generate"]["queries_per_s_beam4"] > 0
    assert (tmp_path / "teacher_profile.txt").stat().st_size > 0
    # the SDPA probe saw the three kinds of T5 attention (encoder self, decoder self and
    # cross) and recorded, per kind, whether the fused kernels accept the call or why not
    sdpa = out["teacher_sdpa"]
    assert "error" not in sdpa and sdpa["distinct_calls"] >= 3
    assert any(c["kind"].startswith("(False") for c in sdpa["calls"])  # cross-attention
    for c in sdpa["calls"]:
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            verdict = c[backend]
            assert verdict == "ok" or (isinstance(verdict, list) and verdict
                                       and all(isinstance(w, str) and w for w in verdict))

    # the index's GPU section needs faiss with GPU support: on CPU it says why it is skipped
    assert "faiss has no GPU support" in out["faiss_gpu"]["skipped"]
