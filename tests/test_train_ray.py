"""Ray Train + DeepSpeed on CPU (gloo), 2 workers, tiny models: learning, S3 checkpoints,
resume, recovery from a killed worker, distillation inputs, QG fine-tuning, bad data."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.config import (
    Config,
    EncoderConfig,
    LossConfig,
    ModelConfig,
    QGTrainConfig,
    RunConfig,
    StudentTrainConfig,
)
from qgscale.data.schema import CANDIDATES, CORPUS, GENERATED, QRELS, QUERIES, SCORES
from qgscale.errors import DataError
from qgscale.train import data as tdata
from qgscale.train.data import generated_qid
from qgscale.train.trainer import run_train_distill, run_train_qg, run_train_warmup

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


def _metrics(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(uri).splitlines() if x.strip()]


def _inputs(toy) -> dict[str, str]:
    d = toy / "data" / "train"
    return {"queries_uri": str(d / "queries"), "corpus_uri": str(d / "corpus"),
            "qrels_uri": str(d / "qrels")}


@pytest.mark.slow
def test_warmup_on_s3_survives_killed_worker_resumes_and_learns(toy, ray_local, s3_bucket,
                                                                 tmp_path):
    """ZeRO-2, 2 workers, checkpoints in S3. Run 1: a worker os._exit()s after step 6;
    FailureConfig restarts from the step-4 checkpoint and the run finishes at step 8.
    Run 2 (same folder, max_steps 16) resumes at step 8. The loss falls."""
    from qgscale.models.encoder import DualEncoder

    marker = tmp_path / "failed-once"
    cfg = _cfg(f"{s3_bucket}/run", str(toy / "tok"), max_steps=8, max_failures=1)
    out = cfg.uri("train", "warmup")
    m = run_train_warmup(cfg, out_uri=out, key="k1",
                         extra={"fail_at_step": 6, "fail_marker": str(marker)}, **_inputs(toy))
    assert marker.exists()  # a worker really died
    assert m["final_metrics"]["step"] == 8
    log = _metrics(storage.join(out, "metrics.jsonl"))
    assert [x["step"] for x in log] == [2, 4, 6, 8]  # step 6 re-done once after the restart
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
    m = run_train_distill(cfg, init_uri=str(tmp_path / "de0"), **teacher)
    assert m["counts"] == {"rows": N, "random_negatives": 0, "without_generated": 0}
    log = _metrics(storage.join(cfg.uri("train", "distill"), "metrics.jsonl"))
    assert log[-1]["step"] == 4
    assert all(x["kd"] > 0 and x["align"] >= 0 for x in log)
    assert all(abs(x["loss"] - x["contrastive"] - x["kd"] - x["align"]) < 1e-3 for x in log)
    from qgscale.models.encoder import DualEncoder

    assert DualEncoder.from_pretrained(m["model"]).encode_queries(["x"]).shape == (1, 32)


@pytest.mark.slow
def test_qg_finetuning_lowers_ce(toy, ray_local, tmp_path):
    from qgscale.models.generator import QueryGenerator

    cfg = Config(run=RunConfig(root=str(tmp_path / "run")), qg=QGTrainConfig(
        model=ModelConfig(init=T5, tokenizer=str(toy / "tok")), num_workers=2,
        cpus_per_worker=0.5, batch_size=8, lr=3e-3, warmup_ratio=0.0, epochs=1,
        log_every=2, checkpoint_every=100, max_query_len=16, max_passage_len=64))
    m = run_train_qg(cfg, out_uri=cfg.uri("train", "qg"), key="k1", **_inputs(toy))
    log = _metrics(storage.join(cfg.uri("train", "qg"), "metrics.jsonl"))
    assert log[-1]["step"] == 8
    assert log[-1]["loss"] < log[0]["loss"]
    qg = QueryGenerator.from_pretrained(m["model"])
    assert qg.prompt == cfg.qg.prompt


def _write(path, rows, schema) -> str:
    storage.write_parquet(str(path / "part-00000.parquet"),
                          pa.Table.from_pylist(rows, schema=schema))
    return str(path)


def test_bad_training_data_names_the_problem(toy, tmp_path):
    inp = _inputs(toy)
    good_c = [{"qid": "q0", "pids": ["p0", "p1"], "scores": [1.0, 0.5]}]
    scores = _write(tmp_path / "s", [{"qid": "q0", "pid": "p0", "score": -1.0, "ntok": 3}],
                    SCORES)
    cands = _write(tmp_path / "c", good_c, CANDIDATES)
    with pytest.raises(DataError, match=r"missing teacher score for qid=q0 pid=p1"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=cands,
                                 scores_uri=scores)
    empty = _write(tmp_path / "e", [{"qid": "q3", "pids": [], "scores": []}], CANDIDATES)
    with pytest.raises(DataError, match=r"/e: row 0 \(qid=q3\): empty candidate list"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=empty,
                                 scores_uri=scores)
    nan = _write(tmp_path / "n", [{"qid": "q0", "pid": "p0", "score": float("nan"),
                                   "ntok": 3}], SCORES)
    with pytest.raises(DataError, match=r"/n: row 0 \(qid=q0, pid=p0\): field 'score'"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=cands,
                                 scores_uri=nan)
    with pytest.raises(DataError, match=r"no candidate list for training qid=q1"):
        tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                 qrels_uri=inp["qrels_uri"], candidates_uri=cands,
                                 scores_uri=_write(tmp_path / "s2", [
                                     {"qid": "q0", "pid": p, "score": -1.0, "ntok": 3}
                                     for p in ("p0", "p1")], SCORES))
    bad_q = _write(tmp_path / "bq", [{"qid": "q0", "lang": "en", "text": ""}], QUERIES)
    with pytest.raises(DataError, match=r"/bq: row 0 \(qid=q0\): empty field 'text'"):
        tdata.build_student_rows(bad_q, inp["corpus_uri"], qrels_uri=inp["qrels_uri"])


def test_student_rows_and_collator(toy, tokenizer):
    inp = _inputs(toy)
    t = toy / "teacher"
    table, counts = tdata.build_student_rows(
        inp["queries_uri"], inp["corpus_uri"], qrels_uri=inp["qrels_uri"],
        candidates_uri=str(t / "candidates"), scores_uri=str(t / "scores"),
        generated_uri=str(t / "generated"), n_hard_negatives=2, n_candidates=3,
        kd_on_generated=True)
    assert counts == {"rows": N, "random_negatives": 0, "without_generated": 0}
    row = table.slice(0, 1).to_pylist()[0]
    assert row["qid"] == "q0" and len(row["passages"]) == 3
    assert row["cand_scores"] == [-1.0, -3.0, -5.0] and row["gen_scores"] == [-1.0, -3.0, -5.0]
    # candidates p1, p2 (not positive) are the hard negatives, in rank order
    corpus = {r["pid"]: r["text"] for r in storage.read_parquet(inp["corpus_uri"]).to_pylist()}
    assert row["passages"] == [corpus["p0"], corpus["p1"], corpus["p2"]]
    batch = {k: table.column(k).to_pylist()[:4] for k in table.column_names}
    batch["cand_texts"][1] = batch["cand_texts"][1][:2]  # a shorter candidate list is padded
    batch["cand_scores"][1] = batch["cand_scores"][1][:2]
    batch["gen_scores"][1] = batch["gen_scores"][1][:2]
    out = tdata.StudentCollator(tokenizer, 16, 64, n_candidates=3)(batch)
    assert out["query"]["input_ids"].shape[0] == 8  # 4 queries + 4 generated
    assert out["passage"]["input_ids"].shape[0] == 4 * 3 + 4 * 3
    assert out["cand_mask"].tolist()[1] == [True, True, False]
    assert out["teacher"][0].tolist() == [-1.0, -3.0, -5.0]
    # without hard negatives in the data, random corpus passages are used and counted
    _, counts = tdata.build_student_rows(inp["queries_uri"], inp["corpus_uri"],
                                         qrels_uri=inp["qrels_uri"], n_hard_negatives=2)
    assert counts["random_negatives"] == 2 * N
