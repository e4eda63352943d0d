"""The machinery of benchmarks/scale.py without Ray: the synthetic data generator (read back
by the project's own BEIR and XOR-TyDi readers), the RSS sampler (it sees a child process's
memory grow) and the per-window peak and growth arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from qgscale.data import readers
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def scale():
    return load_benchmark("scale")


def test_generated_data_reads_back_with_positives(scale, tmp_path):
    info = scale.generate(tmp_path, 500, n_train=40, n_test=10, seed=1)
    assert info["passages"] == 500 and info["corpus_bytes"] > 0
    tables = readers.read_beir(str(tmp_path))
    corpus = {r["pid"]: r for r in tables["corpus"]}
    assert len(corpus) == 500
    lengths = [len(r["text"].split()) for r in corpus.values()]
    assert min(lengths) == max(lengths) == 100
    words, _ = scale.word_list()
    vocab = set(words)
    assert all(w in vocab for r in list(corpus.values())[:20] for w in r["text"].split())
    assert {r["lang"] for r in corpus.values()} == {"en"}
    assert len(tables["train/queries"]) == 40 and len(tables["test/queries"]) == 10
    assert {q["lang"] for q in tables["train/queries"]} == set(scale.XOR_LANGS)
    queries = {q["qid"]: q["text"] for s in ("train", "test") for q in tables[f"{s}/queries"]}
    qrels = tables["train/qrels"] + tables["test/qrels"]
    assert len(qrels) == 50 and len({r["pid"] for r in qrels}) == 50  # one positive each
    for r in qrels:  # the query is a span of its positive passage
        assert queries[r["qid"]] in corpus[r["pid"]]["text"]
    # the same query file in XOR-TyDi's row shape, with answers from the positive passage
    xor = readers.read_xor_queries(str(tmp_path / "queries.jsonl"))
    answers = {a["qid"]: a["answers"] for a in xor["answers"]}
    pos = {r["qid"]: r["pid"] for r in qrels}
    assert all(answers[q][0] in corpus[pos[q]]["text"] for q in answers)
    # deterministic: the same seed writes the same files
    scale.generate(tmp_path / "again", 500, n_train=40, n_test=10, seed=1)
    assert (tmp_path / "again" / "corpus.jsonl").read_bytes() == \
        (tmp_path / "corpus.jsonl").read_bytes()


def test_too_few_passages_for_the_queries(scale, tmp_path):
    with pytest.raises(ValueError, match="at least 50 passages"):
        scale.generate(tmp_path, 20, n_train=40, n_test=10)


GROW = """
import sys, time
print("ready", flush=True)
sys.stdin.readline()
block = bytearray(200 << 20)  # 200 MB, touched so it is resident
for i in range(0, len(block), 4096):
    block[i] = 1
print("grown", flush=True)
sys.stdin.readline()
"""


def test_sampler_sees_a_child_grow(scale):
    """A driver-like parent with a child that allocates 200 MB: the sampler's peaks of the
    window after the allocation exceed those before it by about that much."""
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         f"c = subprocess.Popen([sys.executable, '-c', {GROW!r}])\n"
         "c.wait()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler = scale.RssSampler(parent.pid, interval=0.05).start()
    samples = None
    try:
        assert parent.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        t_grow = time.time()
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "grown"
        time.sleep(0.5)
        t_end = time.time()
        samples = sampler.stop()  # before the processes exit: every sample sees them alive
        parent.stdin.write("\n")
        parent.stdin.flush()
        parent.wait(timeout=20)
    finally:
        if samples is None:
            samples = sampler.stop()
        parent.kill()
    assert len(samples) >= 10
    child = [s for s in samples if s["procs"]]
    assert child and all(kind == "other" for s in child for _, kind, _, _ in s["procs"])
    before = max(rss for s in samples if s["t"] < t_grow for *_, rss in s["procs"])
    after = max(rss for s in samples if t_grow <= s["t"] <= t_end for *_, rss in s["procs"])
    assert after - before > 150 * scale.MB
    assert all(s["driver"] > 0 for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)


def test_peaks_attribute_workers_that_worked(scale):
    """Window peaks: only workers that ran something in the window count as the stage's
    worker peak; an idle worker and a previous stage's actor count in the node's sum."""
    mb = scale.MB
    samples = [
        {"t": 1.0, "driver": 100 * mb, "procs": [(1, "worker", "ray::IDLE", 50 * mb),
                                                  (2, "worker", "ray::Old", 300 * mb)]},
        {"t": 2.0, "driver": 120 * mb, "procs": [(1, "worker", "ray::score", 80 * mb),
                                                  (2, "worker", "ray::Old", 300 * mb),
                                                  (3, "system", "raylet", 40 * mb)]},
        {"t": 3.0, "driver": 110 * mb, "procs": [(1, "worker", "ray::IDLE", 90 * mb),
                                                  (2, "worker", "ray::Old", 300 * mb),
                                                  (4, "worker", "ray::A.run", 60 * mb)]},
    ]
    p = scale.peaks(samples, 1.5, 3.5)
    assert p["samples"] == 2 and p["driver_peak_rss_mb"] == 120
    assert p["worker_peak_rss_mb"] == 90  # pid 1 worked (IDLE -> score); pid 2 sat there
    assert p["worker_peak_by_title"] == {"ray::score": 90, "ray::A.run": 60}
    assert p["workers_sum_peak_rss_mb"] == 450 and p["ray_system_peak_rss_mb"] == 40
    assert p["active_workers"] == 2
    assert scale.classify(["ray::ShardActor.run"], "ray::ShardActo") == \
        ("worker", "ray::ShardActor.run")
    assert scale.classify(["/usr/bin/raylet", "--x"], "raylet")[0] == "system"
    assert scale.classify(["ray::DashboardAgent"], "ray::Dashboard")[0] == "system"


def test_growth_and_verdicts(scale):
    def result(n, driver, worker, wall):
        return {"n": n, "stages": {s: {"driver_peak_rss_mb": driver[i],
                                       "worker_peak_rss_mb": worker[i],
                                       "workers_sum_peak_rss_mb": worker[i], "wall_s": wall[i]}
                                   for i, s in enumerate(("prepare", "index", "mine"))}}
    small = result(1000, [100, 100, 100], [50, 50, 50], [1, 10, 2])
    large = result(11000, [110, 100, 300], [50, 200, 55], [5, 150, 3])
    g = scale.growth(small, large)
    assert g["driver_rss_growth"]["max"] == 3.0 and g["driver_rss_growth"]["max_stage"] == "mine"
    assert g["worker_rss_growth"]["per_stage"]["index"] == 4.0
    assert g["wall_growth"]["per_stage"]["index"] == 15.0
    fit = g["linear_fit"]["mine"]["driver_peak_rss_mb"]
    assert fit["b_bytes_per_passage"] == pytest.approx(0.02 * scale.MB)
    assert fit["at_18M_gb"] == pytest.approx((80 + 0.02 * 18e6) / 1024, rel=1e-3)
    v = scale.verdicts(g)
    assert v["prepare"] == {"driver": True, "worker": True, "wall": True}
    assert v["index"] == {"driver": True, "worker": True, "wall": False}  # index may grow
    assert v["mine"]["driver"] is False
    json.dumps(g)  # the report is JSON
