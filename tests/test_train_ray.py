"""Ray Train + DeepSpeed on CPU (gloo), 2 workers, tiny models: learning, S3 checkpoints,
resume, recovery from a killed worker, exact and elastic resume, fp32 export, TensorBoard
events and MLflow runs, distillation inputs, QG fine-tuning, bad data."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import threading

import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.config import (
    Config,
    EncoderConfig,
    LossConfig,
    MineConfig,
    ModelConfig,
    QGRankConfig,
    QGTrainConfig,
    RunConfig,
    StudentTrainConfig,
)
from qgscale.data.schema import (
    CANDIDATES,
    CORPUS,
    GENERATED,
    QRELS,
    QUERIES,
    SCORES,
    TRAIN_EXAMPLES,
)
from qgscale.errors import DataError
from qgscale.train import data as tdata
from qgscale.train import tracking
from qgscale.train.batch import StudentCollator
from qgscale.train.data import generated_qid
from qgscale.train.trainer import (
    run_train_distill,
    run_train_qg,
    run_train_qg_rank,
    run_train_warmup,
)
from tests.conftest import autoscaler_request

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
      "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu"}
N = 128  # queries = passages: 8 steps per epoch with 2 workers x batch 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tokenizer):
    """A learnable toy set: each query is 5 words of its passage; English, plus a German
    'translation' (the same words reversed) as generated queries."""
    from qgscale.data.readers import bundled_xquad_texts

    root = tmp_path_factory.mktemp("toy")
    tokenizer.save_pretrained(str(root / "tok"))
    paras = [t for t in bundled_xquad_texts(["en"]) if len(t.split()) > 40][:N]
    rng = random.Random(0)
    corpus, queries, qrels, gen = [], [], [], []
    for i, text in enumerate(paras):
        words = text.split()
        start = rng.randrange(0, len(words) - 5)
        corpus.append({"pid": f"p{i}", "lang": "en", "title": "", "text": " ".join(words[:60])})
        queries.append({"qid": f"q{i}", "lang": "en",
                        "text": " ".join(words[start:start + 5])})
        qrels.append({"qid": f"q{i}", "pid": f"p{i}", "rel": 1})
        gen.append({"pid": f"p{i}", "lang": "de", "query": " ".join(words[start:start + 5][::-1]),
                    "logprob": -1.0})
    d = root / "data" / "train"
    for name, rows, schema in [("queries", queries, QUERIES), ("corpus", corpus, CORPUS),
                               ("qrels", qrels, QRELS)]:
        storage.write_parquet(str(d / name / "part-00000.parquet"),
                              pa.Table.from_pylist(rows, schema=schema))
    cands, scores = [], []
    for i in range(N):
        pids = [f"p{i}"] + [f"p{(i + k) % N}" for k in (1, 2, 3)]
        cands.append({"qid": f"q{i}", "pids": pids, "scores": [1.0, 0.5, 0.4, 0.3]})
        gq = generated_qid(f"p{i}", "de", gen[i]["query"])
        for k, p in enumerate(pids):
            scores.append({"qid": f"q{i}", "pid": p, "score": -1.0 - 2 * k, "ntok": 5})
            scores.append({"qid": gq, "pid": p, "score": -1.0 - 2 * k, "ntok": 5})
    for name, rows, schema in [("candidates", cands, CANDIDATES), ("scores", scores, SCORES),
                               ("generated", gen, GENERATED)]:
        storage.write_parquet(str(root / "teacher" / name / "part-00000.parquet"),
                              pa.Table.from_pylist(rows, schema=schema))
    return root


def _cfg(root: str, tok: str, **train) -> Config:
    base = dict(num_workers=2, cpus_per_worker=0.5, batch_size=8, lr=3e-3, warmup_ratio=0.0,
                zero_stage=2, log_every=2, checkpoint_every=4, max_query_len=16,
                max_passage_len=64)
    base.update(train)
    loss = base.pop("loss", LossConfig(alpha=0.0, beta=0.0, n_hard_negatives=1))
    enc = EncoderConfig(model=ModelConfig(init=BERT, tokenizer=tok), pooling="mean",
                        normalize=True, temperature=0.05)
    return Config(run=RunConfig(root=root), encoder=enc,
                  warmup=StudentTrainConfig(loss=loss, **base),
                  distill=StudentTrainConfig(loss=loss, **base))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(uri).splitlines() if x.strip()]


def _inputs(toy) -> dict[str, str]:
    d = toy / "data" / "train"
    return {"queries_uri": str(d / "queries"), "corpus_uri": str(d / "corpus"),
            "qrels_uri": str(d / "qrels")}


def _train_workers(state: str | None = "ALIVE") -> list[int]:
    """PIDs of the Ray Train worker actors of this Ray (``state`` None: also dead ones).

    Read from the GCS actor table: ``ray.util.state`` needs the dashboard, which the test
    Ray runs without."""
    from ray._private import state as gcs

    return sorted(a["Pid"] for a in gcs.actors().values()
                  if a["ActorClassName"] == "RayTrainWorker" and state in (None, a["State"]))


def _registered_step(out: str) -> int:
    """Step of the latest checkpoint that Ray Train has registered for the run under ``out``
    (what a restart resumes from); 0 before the first."""
    import ray.train

    run_dir = storage.join(out, "ray", "run")
    try:
        result = ray.train.Result.from_path(storage.ray_path(run_dir),
                                            storage_filesystem=storage.pyarrow_filesystem(run_dir))
    except (RuntimeError, OSError, ValueError):  # no checkpoint (snapshot) yet
        return 0
    return int((result.metrics or {}).get("step", 0))


def _warmup_killing_a_worker(cfg: Config, out: str, toy, step: int):
    """The warm-up run, while a thread SIGKILLs one Ray Train worker once the checkpoint of
    ``step`` is registered; returns the run's manifest and the killer (what it killed)."""
    killer = KillWorkerAfter(out, step=step)
    killer.start()
    try:
        m = run_train_warmup(cfg, out_uri=out, key="k1", **_inputs(toy))
    finally:
        killer.done.set()
        killer.join(30)
    assert killer.killed, "no worker was killed before the run ended"
    return m, killer


class KillWorkerAfter(threading.Thread):
    """From outside the run: once Ray Train has registered a checkpoint of ``step`` or later
    for the run under ``out``, SIGKILL one Ray Train worker process (a crash: no exception,
    no clean-up)."""

    def __init__(self, out: str, step: int) -> None:
        super().__init__(daemon=True)
        self.out, self.step = out, step
        self.done = threading.Event()
        self.killed: dict[str, int] = {}

    def run(self) -> None:
        while not self.done.is_set():
            registered = _registered_step(self.out)
            pids = _train_workers() if registered >= self.step else []
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                self.killed = {"pid": pids[-1], "registered_step": registered}
                return
            self.done.wait(0.1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # Result.from_path
def test_warmup_on_s3_survives_killed_worker_resumes_and_learns(toy, ray_local, s3_bucket,
                                                                 monkeypatch):
    """ZeRO-2, 2 workers, checkpoints in S3 every 2 steps. Run 1: the test SIGKILLs a worker
    process once Ray Train has registered the step-2 checkpoint; FailureConfig restarts the
    worker group from the last checkpoint and the run finishes at step 8. Run 2 (same folder,
    max_steps 16) resumes at step 8. The loss falls."""
    from qgscale.models.encoder import DualEncoder

    cfg = _cfg(f"{s3_bucket}/run", str(toy / "tok"), max_steps=8, max_failures=1,
               checkpoint_every=2)
    out = cfg.uri("train", "warmup")
    # the controller collects reports (and registers checkpoints) every 0.2 s, not 2 s
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    workers_before = len(_train_workers(state=None))
    m, killer = _warmup_killing_a_worker(cfg, out, toy, step=2)
    with pytest.raises(ProcessLookupError):  # a worker process really died ...
        os.kill(killer.killed["pid"], 0)
    # ... and FailureConfig(max_failures=1) replaced the worker group once (2 + 2 workers)
    assert len(_train_workers(state=None)) - workers_before == 4
    assert m["final_metrics"]["step"] == 8
    log = _metrics(storage.join(out, "metrics.jsonl"))
    assert [x["step"] for x in log] == [2, 4, 6, 8]  # steps after the checkpoint re-done once
    # the second attempt started from a checkpoint taken before the kill, not from step 0
    resumed = max(x["start_step"] for x in log)
    assert killer.killed["registered_step"] <= resumed < 8, (resumed, killer.killed)
    assert [x["start_step"] for x in log] == [0 if x["step"] <= resumed else resumed
                                              for x in log]
    assert all(x["samples_per_s"] > 0 and "eta_s" in x for x in log)
    # the checkpoint is in the S3 bucket, with the ZeRO-2 shards of both workers
    assert m["checkpoint"].startswith(f"{s3_bucket}/run/train/warmup/ray/run/checkpoint_")
    names = " ".join(storage.url_to_fs(m["checkpoint"])[0].find(m["checkpoint"]))
    assert "mp_rank_00_model_states.pt" in names
    assert "zero_pp_rank_0_" in names and "zero_pp_rank_1_" in names
    de = DualEncoder.from_pretrained(m["model"])  # the HF export in S3 loads and encodes
    assert de.encode_passages(["a b c"]).shape == (1, 32)

    cfg2 = _cfg(f"{s3_bucket}/run", str(toy / "tok"), max_steps=16, epochs=2)
    m2 = run_train_warmup(cfg2, out_uri=out, key="k1", **_inputs(toy))  # same key: resume
    log2 = _metrics(storage.join(out, "metrics.jsonl"))
    assert [x["step"] for x in log2] == list(range(2, 17, 2))  # resumed at 8, not from 0
    assert all(x["start_step"] == 8 for x in log2 if x["step"] > 8)
    assert m2["final_metrics"]["step"] == 16
    epoch1 = [x["loss"] for x in log2 if x["step"] <= 8]
    epoch2 = [x["loss"] for x in log2 if x["step"] > 8]
    assert sum(epoch2) / len(epoch2) < sum(epoch1) / len(epoch1) - 0.5, (epoch1, epoch2)


@pytest.mark.slow
def test_distill_with_kd_and_alignment(toy, ray_local, tmp_path):
    loss = LossConfig(alpha=1.0, beta=1.0, n_candidates=4, n_hard_negatives=1,
                      align="student_kl", symmetric=True, kd_on_generated=True, tau_t=0.5)
    cfg = _cfg(str(tmp_path / "run"), str(toy / "tok"), epochs=1, max_steps=4, loss=loss,
               zero_stage=3, precision="bf16", checkpoint_every=100)
    t = toy / "teacher"
    teacher = dict(candidates_uri=str(t / "candidates"), scores_uri=str(t / "scores"),
                   generated_uri=str(t / "generated"), examples_uri=None,
                   out_uri=cfg.uri("train", "distill"), key="k1", **_inputs(toy))
    with pytest.raises(FileNotFoundError, match="train/warmup/model: initial model not found"):
        run_train_distill(cfg, init_uri=cfg.uri("train", "warmup", "model"), **teacher)
    from qgscale.models.encoder import DualEncoder

    DualEncoder.build(cfg.encoder).save_pretrained(str(tmp_path / "de0"))
    # a crash while the stage saved its init: the small files are there, the weights are not
    crashed = storage.join(cfg.uri("train", "distill"), "init")
    storage.makedirs(crashed)
    for name in ("config.json", "dual_encoder.json"):
        shutil.copy(tmp_path / "de0" / name, storage.join(crashed, name))
    m = run_train_distill(cfg, init_uri=str(tmp_path / "de0"), **teacher)
    assert storage.exists(storage.join(crashed, "model.safetensors"))  # written again
    assert m["counts"] == {"rows": N, "random_negatives": 0, "without_generated": 0}
    log = _metrics(storage.join(cfg.uri("train", "distill"), "metrics.jsonl"))
    assert log[-1]["step"] == 4
    assert all(x["kd"] > 0 and x["align"] >= 0 for x in log)
    assert all(abs(x["loss"] - x["contrastive"] - x["kd"] - x["align"]) < 1e-3 for x in log)
    from qgscale.models.encoder import DualEncoder

    assert DualEncoder.from_pretrained(m["model"]).encode_queries(["x"]).shape == (1, 32)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_half_written_init_is_rebuilt(tokenizer, tmp_path, where, request):
    """A crash while the init model was saved (HF writes ``config.json`` before the weights)
    leaves ``init/config.json`` alone: a resume writes the init again instead of taking it
    as finished; a complete init (its manifest is written last) is kept."""
    import torch
    from transformers import T5ForConditionalGeneration

    from qgscale.models.generator import QueryGenerator
    from qgscale.models.tiny import tiny_t5_config
    from qgscale.train.trainer import init_model

    out = str(tmp_path / "qg") if where == "local" else \
        f"{request.getfixturevalue('s3_bucket')}/train/qg"
    torch.manual_seed(0)
    qg = QueryGenerator(T5ForConditionalGeneration(tiny_t5_config(len(tokenizer))).eval(),
                        tokenizer, max_passage_len=64, max_query_len=16)
    storage.write_bytes(storage.join(out, "init", "config.json"),
                        qg.model.config.to_json_string().encode())  # the crash: no weights
    built = []
    init = init_model(out, "k1", lambda: built.append(1) or qg)
    assert built == [1] and storage.stage_done(init, "k1")
    assert storage.exists(storage.join(init, "model.safetensors"))
    again = QueryGenerator.from_pretrained(init)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 qg.model.state_dict().values(), strict=True))
    assert init_model(out, "k1", lambda: built.append(2) or qg) == init and built == [1]


@pytest.mark.slow
def test_qg_finetuning_lowers_ce(toy, ray_local, tmp_path):
    from qgscale.models.generator import QueryGenerator

    cfg = Config(run=RunConfig(root=str(tmp_path / "run")), qg=QGTrainConfig(
        model=ModelConfig(init=T5, tokenizer=str(toy / "tok")), num_workers=2,
        cpus_per_worker=0.5, batch_size=8, lr=3e-3, warmup_ratio=0.0, epochs=1,
        log_every=2, checkpoint_every=100, max_query_len=16, max_passage_len=64))
    # a crash while the stage saved its init: HF wrote config.json, not yet the weights
    crashed = storage.join(cfg.uri("train", "qg"), "init", "config.json")
    storage.write_bytes(crashed, QueryGenerator.build(cfg.qg.model).model.config
                        .to_json_string().encode())
    seen, done = [], threading.Event()

    def watch() -> None:  # what the autoscaler is asked for while the stage runs
        while not done.wait(0.2):
            seen.append(autoscaler_request().count({"CPU": 0.5}))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        m = run_train_qg(cfg, out_uri=cfg.uri("train", "qg"), key="k1", **_inputs(toy))
    finally:
        done.set()
        watcher.join()
    log = _metrics(storage.join(cfg.uri("train", "qg"), "metrics.jsonl"))
    assert log[-1]["step"] == 8
    assert log[-1]["loss"] < log[0]["loss"]
    qg = QueryGenerator.from_pretrained(m["model"])
    assert qg.prompt == cfg.qg.prompt
    # Ray Train asked the autoscaler for the two workers itself, and withdrew the request
    assert max(seen) == 2 and autoscaler_request().count({"CPU": 0.5}) == 0


def _positive_first(qg, toy, examples: list[dict]) -> float:
    """Share of the toy queries whose teacher score ranks their positive above all of their
    hard negatives."""
    queries = {r["qid"]: r["text"] for r in storage.read_parquet(
        str(toy / "data" / "train" / "queries")).to_pylist()}
    corpus = {r["pid"]: r["text"] for r in storage.read_parquet(
        str(toy / "data" / "train" / "corpus")).to_pylist()}
    pairs = [(queries[e["qid"]], corpus[p], "en") for e in examples
             for p in e["pos_pids"] + e["neg_pids"]]
    s = qg.score(pairs, precision="fp32").mean.reshape(len(examples), -1)
    return float((s[:, 1:].max(1) < s[:, 0]).mean())


@pytest.mark.slow
def test_qg_rank_finetune_learns_to_rank(toy, ray_local, tmp_path):
    """``train qg-rank`` on Ray Train + DeepSpeed (2 workers, ZeRO-2), 16 toy queries for 40
    epochs: the listwise loss over the QG's scores of the positive and 3 mined negatives
    falls, the exported teacher ranks more positives first than the QG it started from, and
    its generation NLL falls too."""
    from qgscale.models.generator import QueryGenerator

    qg_dir = str(tmp_path / "qg")
    start = QueryGenerator.build(ModelConfig(init=T5, tokenizer=str(toy / "tok")),
                                 max_passage_len=64, max_query_len=16, seed=0)
    start.save_pretrained(qg_dir)
    n = 16  # queries: one step per epoch (2 workers x 8), 40 epochs
    examples = [{"qid": f"q{i}", "pos_pids": [f"p{i}"],
                 "neg_pids": [f"p{(i + k) % N}" for k in (1, 2, 3)]} for i in range(n)]
    ex_uri = _write(tmp_path / "mine" / "train", examples, TRAIN_EXAMPLES)
    rank = QGRankConfig(num_workers=2, cpus_per_worker=0.5, batch_size=8, lr=3e-3,
                        warmup_ratio=0.0, zero_stage=2, log_every=5, checkpoint_every=100,
                        epochs=40, n_negatives=3, gen_weight=0.1)
    cfg = Config(run=RunConfig(root=str(tmp_path / "run")), qg_rank=rank,
                 qg=QGTrainConfig(model=ModelConfig(name_or_path=qg_dir), max_passage_len=64,
                                  max_query_len=16), mine=MineConfig(n_negatives=3))
    inputs = {k: v for k, v in _inputs(toy).items() if k != "qrels_uri"}
    out = cfg.uri("train", "qg-rank")
    m = run_train_qg_rank(cfg, out_uri=out, key="k1", qg_model=ModelConfig(name_or_path=qg_dir),
                          examples_uri=ex_uri, **inputs)
    assert m["counts"] == {"rows": n, "short_lists": 0, "no_negatives": 0}
    log = _metrics(storage.join(out, "metrics.jsonl"))
    assert log[-1]["step"] == 40
    assert log[-1]["rank"] < 0.7 * log[0]["rank"]
    assert all(abs(x["loss"] - x["rank"] - 0.1 * x["gen"]) < 1e-3 for x in log)
    tuned = QueryGenerator.from_pretrained(m["model"])
    assert tuned.prompt == start.prompt and tuned.max_passage_len == 64
    before, after = _positive_first(start, toy, examples), _positive_first(tuned, toy, examples)
    assert after >= before + 0.25, (before, after)
    assert log[-1]["gen"] < log[0]["gen"]  # the generation term is trained too


def _write(path, rows, schema) -> str:
    storage.write_parquet(str(path / "part-00000.parquet"),
                          pa.Table.from_pylist(rows, schema=schema))
    return str(path)


def test_driver_rows_read_only_the_scores_they_carry(tmp_path):
    """The scores table holds every candidate (``mine.top_k``) of every query; the driver
    keeps the pairs its rows carry, one shard at a time, and still checks every score."""
    rows = [{"qid": f"q{i}", "pid": f"p{j}", "score": -float(j), "ntok": 3}
            for i in range(4) for j in range(30)]
    uri = str(tmp_path / "s")
    storage.write_parquet(f"{uri}/part-00000.parquet", pa.Table.from_pylist(rows[:60], SCORES))
    storage.write_parquet(f"{uri}/part-00001.parquet", pa.Table.from_pylist(rows[60:], SCORES))
    wanted = {("q0", "p1"), ("q3", "p29"), ("q9", "p0")}
    assert tdata.load_scores(uri, wanted) == {("q0", "p1"): -1.0, ("q3", "p29"): -29.0}
    rows[100]["score"] = float("inf")  # a pair no row uses
    storage.write_parquet(f"{uri}/part-00001.parquet", pa.Table.from_pylist(rows[60:], SCORES))
    with pytest.raises(DataError, match=r"part-00001.parquet: row 40 \(qid=q3, pid=p10\)"):
        tdata.load_scores(uri, wanted)


def test_bad_training_data_names_the_problem(toy, tmp_path):
    inp = _inputs(toy)
    good_c = [{"qid": "q0", "pids": ["p0", "p1"], "scores": [1.0, 0.5]}]
    scores = _write(tmp_path / "s", [{"qid": "q0", "pid": "p0", "score": -1.0, "ntok": 3}],
                    SCORES)
    cands = _write(tmp_path / "c", good_c, CANDIDATES)
    every = _write(tmp_path / "a", good_c + [{"qid": f"q{i}", "pids": [f"p{i}"], "scores": [0.0]}
                                             for i in range(1, N)], CANDIDATES)
    with pytest.raises(DataError, match=r"missing teacher score for qid=q0 pid=p1"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=every,
                                 scores_uri=scores)
    twice = _write(tmp_path / "t", good_c + good_c, CANDIDATES)
    with pytest.raises(DataError, match=r"/t: qid=q0 has two rows \(one candidate list"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=twice,
                                 scores_uri=scores)
    empty = _write(tmp_path / "e", [{"qid": "q3", "pids": [], "scores": []}], CANDIDATES)
    with pytest.raises(DataError, match=r"/e/part-00000.parquet: row 0 \(qid=q3\): empty "
                                         r"candidate list"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=empty,
                                 scores_uri=scores)
    nan = _write(tmp_path / "n", [{"qid": "q0", "pid": "p0", "score": float("nan"),
                                   "ntok": 3}], SCORES)
    with pytest.raises(DataError, match=r"/n/part-00000.parquet: row 0 \(qid=q0, pid=p0\): "
                                        r"field 'score'"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=every,
                                 scores_uri=nan)
    with pytest.raises(DataError, match=r"no candidate list for training qid=q1"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=cands,
                                 scores_uri=_write(tmp_path / "s2", [
                                     {"qid": "q0", "pid": p, "score": -1.0, "ntok": 3}
                                     for p in ("p0", "p1")], SCORES))
    bad_q = _write(tmp_path / "bq", [{"qid": "q0", "lang": "en", "text": ""}], QUERIES)
    with pytest.raises(DataError, match=r"/bq/part-00000.parquet: row 0 \(qid=q0\): "
                                        r"empty field 'text'"):
        tdata.build_student_rows(bad_q, inp["corpus_uri"], qrels_uri=inp["qrels_uri"])


def test_student_rows_and_collator(toy, tokenizer):
    inp = _inputs(toy)
    t = toy / "teacher"
    table, counts = tdata.build_student_rows(
        inp["queries_uri"], inp["corpus_uri"], qrels_uri=inp["qrels_uri"],
        candidates_uri=str(t / "candidates"), scores_uri=str(t / "scores"),
        generated_uri=str(t / "generated"),
        loss=LossConfig(n_hard_negatives=2, n_candidates=3, kd_on_generated=True))
    assert counts == {"rows": N, "random_negatives": 0, "without_generated": 0}
    row = next(r for r in table.to_pylist() if r["qid"] == "q0")
    assert len(row["passages"]) == 3
    assert row["cand_scores"] == [-1.0, -3.0, -5.0] and row["gen_scores"] == [-1.0, -3.0, -5.0]
    # candidates p1, p2 (not positive) are the hard negatives, in rank order
    corpus = {r["pid"]: r["text"] for r in storage.read_parquet(inp["corpus_uri"]).to_pylist()}
    assert row["passages"] == [corpus["p0"], corpus["p1"], corpus["p2"]]
    assert row["passage_ids"] == [tdata.pid_key(p) for p in ("p0", "p1", "p2")]
    assert row["positive_ids"] == [tdata.pid_key("p0")]
    batch = {k: table.column(k).to_pylist()[:4] for k in table.column_names}
    batch["cand_texts"][1] = batch["cand_texts"][1][:2]  # a shorter candidate list is padded
    batch["cand_scores"][1] = batch["cand_scores"][1][:2]
    batch["gen_scores"][1] = batch["gen_scores"][1][:2]
    out = StudentCollator(tokenizer, 16, 64, n_candidates=3)(batch)
    assert len(out) == 4 and len(out.generated) == 4 and out.gen_mask.all()
    assert len(out.groups) == 4 * 3 and out.group_size == 3 and len(out.candidates) == 4 * 3
    assert out.cand_mask.tolist()[1] == [True, True, False]
    assert out.teacher_scores[0].tolist() == [-1.0, -3.0, -5.0]
    assert out.gen_teacher_scores[1].tolist() == [-1.0, -3.0, 0.0] and out.gen_teacher_mask.all()
    assert out.group_ids.tolist() == [x for r in batch["passage_ids"] for x in r]
    assert out.positive_ids.tolist() == batch["positive_ids"]
    queries, passages = out.encoder_inputs()  # one encoder pass per side
    assert len(queries) == 8 and len(passages) == 4 * 3 + 4 * 3
    # without hard negatives in the data, random corpus passages are used and counted
    _, counts = tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                         LossConfig(n_hard_negatives=2),
                                         qrels_uri=inp["qrels_uri"])
    assert counts["random_negatives"] == 2 * N


# --- exact / elastic resume, fp32 export, tracking ------------------------------------------
EXACT = dict(precision="fp32", zero_stage=2, epochs=2, max_steps=12, log_every=1,
             checkpoint_every=2)  # 12 steps cross the epoch boundary (8 steps per epoch)


@pytest.fixture(scope="module")
def reference_run(toy, ray_local, tmp_path_factory):
    """An uninterrupted ZeRO-2 fp32 warm-up on 2 workers, every step logged (also to MLflow,
    a local file store): (stage folder, manifest, MLflow tracking URI)."""
    root = tmp_path_factory.mktemp("ref")
    mlruns = f"file://{root}/mlruns"
    cfg = _cfg(str(root / "run"), str(toy / "tok"), mlflow_uri=mlruns, **EXACT)
    out = cfg.uri("train", "warmup")
    m = run_train_warmup(cfg, out_uri=out, key="k1", **_inputs(toy))
    return out, m, mlruns


def _mlflow_run(uri: str):
    """(client, the only run of the ``qgscale`` experiment) of the MLflow store ``uri``."""
    client = tracking.mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("qgscale").experiment_id])
    return client, run


def _mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # Result.from_path
def test_exact_resume(toy, reference_run, tmp_path, monkeypatch):
    """A worker is SIGKILLed (from outside) after the step-4 checkpoint is registered; the
    restarted worker group resumes from it. Every step's loss (dropout on) equals the
    uninterrupted run's to 1e-5, and so do the exported weights. The restarted attempt
    reopens the MLflow run: every step in it once."""
    from qgscale.models.encoder import DualEncoder

    ref_out, ref, _ = reference_run
    mlruns = f"file://{tmp_path}/mlruns"
    cfg = _cfg(str(tmp_path / "run"), str(toy / "tok"), max_failures=1, mlflow_uri=mlruns,
               **EXACT)
    out = cfg.uri("train", "warmup")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    m, killer = _warmup_killing_a_worker(cfg, out, toy, step=4)
    log, ref_log = _metrics(storage.join(out, "metrics.jsonl")), _metrics(
        storage.join(ref_out, "metrics.jsonl"))
    resumed = max(x["start_step"] for x in log)
    assert 4 <= resumed < 12, (resumed, killer.killed)  # a restart from a checkpoint
    assert [x["step"] for x in log] == [x["step"] for x in ref_log] == list(range(1, 13))
    assert {x["epoch"] for x in log} == {0, 1}
    for a, b in zip(log, ref_log, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
    assert m["final_metrics"]["step"] == 12
    w, w_ref = (DualEncoder.from_pretrained(x["model"]).state_dict() for x in (m, ref))
    assert max((w[k] - w_ref[k]).abs().max().item() for k in w) <= 1e-5
    client, run = _mlflow_run(mlruns)  # one MLflow run, reopened, finished
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "samples_per_s"):
        hist = _mlflow_history(client, run.info.run_id, key)
        assert [s for s, _ in hist] == list(range(1, 13)), key  # no step twice
    for (step, v), x in zip(_mlflow_history(client, run.info.run_id, "loss"), log, strict=True):
        assert abs(v - x["loss"]) <= 1e-5, (step, v, x["loss"])
    # steps up to the checkpoint resumed from: the values metrics.jsonl kept, exactly
    elapsed = dict(_mlflow_history(client, run.info.run_id, "elapsed_s"))
    assert all(elapsed[x["step"]] == x["elapsed_s"] for x in log if x["step"] <= resumed)


@pytest.mark.slow
def test_tensorboard_events(toy, reference_run):
    """The stage folder's TensorBoard event file, read back with TensorBoard's reader, holds
    the logged loss of every step, equal to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = reference_run
    log = _metrics(storage.join(out, "metrics.jsonl"))
    acc = EventAccumulator(storage.join(out, "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/contrastive", "train/lr", "train/samples_per_s"} <= set(tags)
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [x["step"] for x in log] == list(range(1, 13))
    for e, x in zip(events, log, strict=True):
        assert e.value == pytest.approx(x["loss"], rel=1e-6)  # stored as float32
        assert e.wall_time == pytest.approx(x["time"], abs=1e-3)


@pytest.mark.slow
def test_mlflow_tracking(toy, reference_run):
    """The warm-up's MLflow run (a local file store, written by rank 0), read back with
    MLflow's client: one finished run of the stage with the training config as params, and
    every metric's history equal to metrics.jsonl, step by step."""
    out, _, mlruns = reference_run
    log = _metrics(storage.join(out, "metrics.jsonl"))
    client, run = _mlflow_run(mlruns)  # rank 0 only: one run
    assert run.info.status == "FINISHED" and run.info.run_name == "warmup"
    assert run.data.tags["qgscale.output"] == out
    p = run.data.params
    assert (p["lr"], p["max_steps"], p["zero_stage"], p["loss.n_hard_negatives"]) == (
        "0.003", "12", "2", "1")
    keys = set(tracking.scalars(log[0]))
    assert {"loss", "contrastive", "lr", "samples_per_s", "eta_s"} <= keys
    assert set(run.data.metrics) == keys
    for key in keys:
        hist = client.get_metric_history(run.info.run_id, key)
        assert [(h.step, h.value) for h in hist] == [(x["step"], float(x[key])) for x in log]
        assert [h.timestamp for h in hist] == [int(1000 * x["time"]) for x in log]
    assert [x["step"] for x in log] == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # Result.from_path
def test_elastic_resume(toy, ray_local, tmp_path, caplog, monkeypatch):
    """ZeRO-2 on 2 workers to step 4 (checkpointed), then the same run on 1 worker: it
    resumes from a DeepSpeed universal checkpoint (weights and AdamW state) at the same place
    in the sample stream and finishes the epoch; the loss keeps falling. Then the other
    option, fp32 weights with a fresh optimizer, on the 2-worker checkpoint."""
    root, tok = str(tmp_path / "run"), str(toy / "tok")
    base = dict(zero_stage=2, precision="fp32", epochs=1, log_every=1, checkpoint_every=4)
    cfg2 = _cfg(root, tok, max_steps=4, **base)
    out = cfg2.uri("train", "warmup")
    run_train_warmup(cfg2, out_uri=out, key="k1", **_inputs(toy))
    ckpt2 = shutil.copytree(_registered_checkpoint(out), tmp_path / "ckpt2")
    cfg1 = _cfg(root, tok, num_workers=1, cpus_per_worker=1, **base)
    m = run_train_warmup(cfg1, out_uri=out, key="k1", **_inputs(toy))
    log = _metrics(storage.join(out, "metrics.jsonl"))
    # 4 steps of 16 samples, then the epoch's other 64 samples in steps of 8 on 1 worker
    assert [x["step"] for x in log] == list(range(1, 13))
    assert [x["world"] for x in log] == [2] * 4 + [1] * 8
    assert all(x["start_step"] == 4 and x["resume"] == "universal" for x in log[4:])
    assert m["final_metrics"]["step"] == 12
    before = [x["loss"] for x in log[:4]]
    after = [x["loss"] for x in log[4:]]
    # no jump back up when the optimizer state is restored, and still falling
    assert after[0] < before[0]
    # both halves after the resume below the steps before it (the toy's random negatives
    # make consecutive windows noisy)
    assert max(sum(after[4:]), sum(after[:4])) / 4 < sum(before) / 4, (before, after)
    _check_weights_resume(cfg1, ckpt2, caplog, monkeypatch)


def _registered_checkpoint(out: str) -> str:
    import ray.train

    run_dir = storage.join(out, "ray", "run")
    return ray.train.Result.from_path(run_dir).checkpoint.path


def _check_weights_resume(cfg, ckpt_dir, caplog, monkeypatch) -> None:
    """``elastic_resume: weights`` in this process (1 worker, gloo): the 2-worker ZeRO-2
    checkpoint's consolidated fp32 weights are loaded with a fresh optimizer, and a warning
    says what was lost."""
    import logging

    import torch
    import torch.distributed as dist

    from qgscale.train.loop import Restored, TrainRun, fp32_weights, restore
    from qgscale.train.tasks import StudentTask

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(k, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    tc = cfg.warmup.model_copy(update={"elastic_resume": "weights"})
    out = cfg.uri("train", "warmup")
    run = TrainRun(StudentTask(tc), init_uri=storage.join(out, "init"), output_uri=out,
                   rows=N)
    restored = Restored(str(ckpt_dir), json.loads((ckpt_dir / "qgscale_state.json").read_text()))
    try:
        with caplog.at_level(logging.WARNING, logger="qgscale.train"), \
                contextlib.ExitStack() as stack:
            engine, _, plan, at, mode = restore(run, 1, restored, stack)
        assert mode == "weights" and (at.step, at.epoch, at.offset) == (4, 0, 64)
        assert "LOST: the optimizer state" in caplog.text and "written by 2 workers" in caplog.text
        want = fp32_weights(str(ckpt_dir))
        got = dict(engine.module.named_parameters())
        assert all(torch.equal(got[k].detach(), want[k]) for k in got)
        assert engine.global_steps == 4 and plan.total == 12
        moments = [st["exp_avg"] for st in engine.optimizer.optimizer.state.values()]
        assert all(not m.any() for m in moments)  # a fresh AdamW state (ZeRO fills zeros)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_fp32_export(toy, ray_local, tmp_path):
    """bf16 ZeRO-2 on 2 workers: the exported model holds the fp32 master weights exactly
    (max abs difference 0 to zero_to_fp32 of the final checkpoint), not the bf16 weights the
    model computed with; model-bf16/ is their bf16 copy."""
    import glob

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from qgscale.models.encoder import DualEncoder

    cfg = _cfg(str(tmp_path / "run"), str(toy / "tok"), zero_stage=2, precision="bf16",
               max_steps=4, checkpoint_every=100, export_bf16=True)
    out = cfg.uri("train", "warmup")
    m = run_train_warmup(cfg, out_uri=out, key="k1", **_inputs(toy))
    master = get_fp32_state_dict_from_zero_checkpoint(m["checkpoint"], tag="ckpt")
    exported = DualEncoder.from_pretrained(m["model"]).state_dict()
    params = [k for k in master if k in exported]
    assert len(params) > 10 and all(master[k].dtype == torch.float32 for k in params)
    assert max((exported[k] - master[k]).abs().max().item() for k in params) == 0.0
    # the masters are not bf16 values: a bf16 export would differ from them
    assert max((master[k] - master[k].bfloat16().float()).abs().max().item()
               for k in params) > 0
    (bf16_file,) = glob.glob(os.path.join(out, "model-bf16", "*.safetensors"))
    bf16 = load_file(bf16_file)
    assert {v.dtype for v in bf16.values() if v.is_floating_point()} == {torch.bfloat16}
    for k, v in bf16.items():
        if v.is_floating_point():
            assert torch.equal(v, exported["query_model." + k].bfloat16())
    assert DualEncoder.from_pretrained(os.path.join(out, "model-bf16")).encode_queries(
        ["x"]).shape == (1, 32)


def test_candidate_lists_are_cut_to_what_rows_read(tmp_path):
    """load_candidates keeps each list's head only when asked (a row reads its first
    n_candidates and its negatives from the head less its positives), file by file."""
    lists = [{"qid": f"q{i}", "pids": [f"p{j}" for j in range(100)], "scores": None}
             for i in range(3)]
    uri = _write(tmp_path / "c", lists, CANDIDATES)
    assert tdata.load_candidates(uri)["q1"] == [f"p{j}" for j in range(100)]
    assert tdata.load_candidates(uri, 4) == {f"q{i}": ["p0", "p1", "p2", "p3"]
                                             for i in range(3)}
