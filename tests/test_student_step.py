"""The student's batch and training step as plain torch (no Ray, no DeepSpeed): the collator's
named blocks, and ``student_step`` against the losses computed block by block."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from qgscale.config import EncoderConfig, LossConfig, ModelConfig, StudentTrainConfig
from qgscale.errors import DataError
from qgscale.models.encoder import DualEncoder
from qgscale.train import losses
from qgscale.train.batch import StudentBatch, StudentCollator, Tokens
from qgscale.train.loop import TrainRun, plan_steps
from qgscale.train.tasks import StudentTask, student_step

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
WORDS = ("river bank money house tree water city music light stone paper road cloud "
         "garden window bread").split()


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _rows(b: int = 4, gen: tuple = (1, 1, 0, 1), gen_scores: tuple = (1, 0, 0, 1)) -> dict:
    """Training rows: row 1 has 2 of 3 candidates, row 2 no generated query, rows 0 and 3
    teacher scores for their generated query."""
    n_c = [2 if i == 1 else 3 for i in range(b)]
    return {"qid": [f"q{i}" for i in range(b)], "query": [_text(i, 4) for i in range(b)],
            "passages": [[_text(10 + i, 20), _text(20 + i, 12)] for i in range(b)],
            "cand_texts": [[_text(30 + i + k, 15) for k in range(n_c[i])] for i in range(b)],
            "cand_scores": [[-1.0 - i, -2.0, -3.5][:n_c[i]] for i in range(b)],
            "gen_query": [_text(40 + i, 3) if gen[i] else "" for i in range(b)],
            "gen_scores": [[-0.5, -2.5, -1.0][:n_c[i]] if gen_scores[i] else []
                           for i in range(b)]}


@pytest.fixture(scope="module")
def model(tokenizer) -> DualEncoder:
    torch.manual_seed(0)
    enc = EncoderConfig(model=ModelConfig(init=BERT), pooling="mean", normalize=True,
                        temperature=0.05)
    return DualEncoder.build(enc, tokenizer=tokenizer).eval()  # eval: no dropout


def test_collator_named_blocks(tokenizer):
    batch = StudentCollator(tokenizer, 16, 48, n_candidates=3)(_rows())
    assert len(batch) == 4 and batch.group_size == 2 and batch.n_candidates == 3
    assert len(batch.groups) == 8 and len(batch.candidates) == 12 and len(batch.generated) == 4
    assert batch.gen_mask.tolist() == [True, True, False, True]
    assert batch.cand_mask[1].tolist() == [True, True, False]
    assert batch.teacher_scores[1].tolist() == [-2.0, -2.0, 0.0]
    assert batch.gen_teacher_mask.tolist() == [True, False, False, True]
    assert batch.gen_teacher_scores[0].tolist() == [-0.5, -2.5, -1.0]
    # row 2 has no generated query: its slot repeats the query (masked out of the losses)
    assert torch.equal(batch.generated.input_ids[2], batch.queries.input_ids[2])
    queries, passages = batch.encoder_inputs()
    assert torch.equal(queries.input_ids[:4], batch.queries.input_ids)
    assert torch.equal(passages.input_ids[8:], batch.candidates.input_ids)
    moved = batch.to("cpu")
    assert isinstance(moved, StudentBatch) and torch.equal(moved.cand_mask, batch.cand_mask)
    # warm-up rows: no candidates, no generated queries
    warm = StudentCollator(tokenizer, 16, 48)(_rows(gen=(0, 0, 0, 0), gen_scores=(0,) * 4))
    assert warm.candidates is warm.teacher_scores is warm.generated is None
    assert not warm.gen_mask.any() and warm.encoder_inputs()[0] is warm.queries
    # no teacher scores for any generated query: None, not zeros
    nogs = StudentCollator(tokenizer, 16, 48, n_candidates=3)(_rows(gen_scores=(0,) * 4))
    assert nogs.gen_teacher_scores is None and nogs.gen_teacher_mask is None


def test_tokens_cat_pads_to_the_longest():
    a = Tokens(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    b = Tokens(torch.full((1, 5), 7), torch.ones(1, 5, dtype=torch.long))
    c = Tokens.cat(a, None, b)
    assert c.input_ids.shape == (3, 5) and c.attention_mask[:2, 3:].sum() == 0
    assert Tokens.cat(a, None) is a


@pytest.mark.parametrize("align", ["student_kl", "teacher_kl", "mse", "cosine"])
def test_student_step_is_the_sum_of_the_block_losses(tokenizer, model, align):
    lc = LossConfig(alpha=0.5, beta=0.25, tau_s=0.7, tau_t=0.5, align=align, symmetric=True,
                    n_candidates=3)
    batch = StudentCollator(tokenizer, 16, 48, n_candidates=3)(_rows())
    loss, parts = student_step(model, batch, lc, model.temperature, world_size=1)
    # the same losses with every block encoded on its own
    q = model.encode_query(**batch.queries.inputs())
    gen = model.encode_query(**batch.generated.inputs())
    groups = model.encode_passage(**batch.groups.inputs())
    cands = model.encode_passage(**batch.candidates.inputs()).view(4, 3, -1)
    t = model.temperature
    s_q, s_gen = losses.candidate_scores(q, cands, t), losses.candidate_scores(gen, cands, t)
    con = losses.contrastive_loss(q, groups, 2, t)
    kd_rows, g = batch.gen_teacher_mask, batch.gen_mask
    kd = losses.kd_loss(torch.cat([s_q, s_gen[kd_rows]]),
                        torch.cat([batch.teacher_scores, batch.gen_teacher_scores[kd_rows]]),
                        tau_s=0.7, tau_t=0.5,
                        mask=torch.cat([batch.cand_mask, batch.cand_mask[kd_rows]]))
    al = losses.alignment_loss(align, s_q=s_q[g], s_gen=s_gen[g], t_q=batch.teacher_scores[g],
                               e_q=q[g], e_gen=gen[g], tau_s=0.7, tau_t=0.5, symmetric=True,
                               mask=batch.cand_mask[g])
    assert parts["contrastive"] == pytest.approx(con.item(), abs=1e-5)
    assert parts["kd"] == pytest.approx(kd.item(), abs=1e-5)
    assert parts["align"] == pytest.approx(al.item(), abs=1e-5)
    assert parts["loss"] == pytest.approx(con.item() + 0.5 * kd.item() + 0.25 * al.item(),
                                          abs=1e-5)
    assert loss.item() == pytest.approx(parts["loss"], abs=1e-5)


def test_student_step_backward_in_plain_torch(tokenizer, model):
    """The gpu_check path: the DualEncoder itself as the engine, a hand-built batch."""
    batch = StudentCollator(tokenizer, 16, 48)(_rows(gen=(1, 0, 1, 1)))
    lc = LossConfig(alpha=1.0, beta=1.0, align="mse")
    loss1, parts = student_step(model, batch, lc, model.temperature, world_size=1)
    assert set(parts) == {"contrastive", "align", "loss"}  # no candidates: no KD
    loss2, _ = student_step(model, batch, lc, model.temperature, world_size=2)
    # the contrastive term is backpropagated times the world size (gathered negatives)
    assert loss2.item() == pytest.approx(loss1.item() + parts["contrastive"], abs=1e-5)
    model.zero_grad()
    loss1.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    hand = StudentBatch(queries=batch.queries, groups=batch.groups, group_size=2)
    loss3, parts3 = StudentTask(StudentTrainConfig(loss=lc)).step(model, hand, 1)
    assert set(parts3) == {"contrastive", "loss"}
    assert parts3["contrastive"] == pytest.approx(parts["contrastive"], abs=1e-6)


def test_shared_positives_are_no_negatives(tokenizer, model, caplog):
    """Rows 0 and 2 are parallel queries with one positive passage (rows written with
    ``passage_ids`` / ``positive_ids``): the step leaves each one's copy of that passage out of
    the other's negatives; rows without the ids mask nothing; a row missing them is an error."""
    rows = _rows(gen=(0, 0, 0, 0), gen_scores=(0,) * 4)
    rows["passages"][2][0] = rows["passages"][0][0]
    rows["passage_ids"] = [[100, 10], [101, 11], [100, 12], [103, 13]]
    rows["positive_ids"] = [[100], [101], [100, 7], [103]]
    batch = StudentCollator(tokenizer, 16, 48)(rows)
    lc = LossConfig(alpha=0.0, beta=0.0)
    _, parts = student_step(model, batch, lc, model.temperature, world_size=1)
    assert parts["shared_positives"] == pytest.approx(0.5)  # rows 0 and 2: one copy each
    q = model.encode_query(**batch.queries.inputs())
    groups = model.encode_passage(**batch.groups.inputs())
    exclude = (torch.tensor([0, 2]), torch.tensor([4, 0]))
    t = model.temperature
    masked = losses.contrastive_loss(q, groups, 2, t, exclude).item()
    assert parts["contrastive"] == pytest.approx(masked, abs=1e-5)
    assert masked < losses.contrastive_loss(q, groups, 2, t).item()
    del rows["passage_ids"], rows["positive_ids"]
    with caplog.at_level(logging.WARNING, "qgscale.train.batch"):
        plain = StudentCollator(tokenizer, 16, 48)(rows)
    assert plain.group_ids is None and "without passage_ids" in caplog.text
    _, parts = student_step(model, plain, lc, model.temperature, world_size=1)
    assert "shared_positives" not in parts
    rows["passage_ids"] = [[100, 10], None, [100, 12], [103, 13]]
    rows["positive_ids"] = [[100], [101], [100], [103]]
    with pytest.raises(DataError, match="qid=q1: fields 'passage_ids'"):
        StudentCollator(tokenizer, 16, 48)(rows)


def test_train_run_pickles_and_hides_storage_secrets():
    run = TrainRun(StudentTask(StudentTrainConfig(batch_size=4), distill=True), init_uri="i",
                   output_uri="s3://b/o", rows=64, storage_env={"AWS_SECRET_ACCESS_KEY": "x"})
    back = pickle.loads(pickle.dumps(run))
    assert back == run and back.config.batch_size == 4 and back.task.distill
    assert "AWS_SECRET" not in repr(run)  # Ray stringifies train_loop_config for its state
    assert back.metrics_uri == "s3://b/o/metrics.jsonl"
    plan = plan_steps(64, 2, run.config)
    assert (plan.per_epoch, plan.total, plan.samples_per_step) == (8, 8, 8)
    with pytest.raises(ValueError, match="too few"):
        plan_steps(4, 2, run.config)


def _worker_step(rank: int, port: int, tok_dir: str, out: str) -> None:
    import os

    from transformers import AutoTokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(0)
        enc = EncoderConfig(model=ModelConfig(init=BERT), pooling="mean", normalize=True,
                            temperature=0.05)
        model = DualEncoder.build(enc, tokenizer=tok).eval()
        lc = LossConfig(alpha=0.5, beta=0.25, n_candidates=3, kd_on_generated=True)
        # worker 1's micro-batch has no generated query: it still joins the all-reduce
        rows = _rows() if rank == 0 else _rows(gen=(0, 0, 0, 0), gen_scores=(0, 0, 0, 0))
        batch = StudentCollator(tok, 16, 48, n_candidates=3)(rows)
        _, parts = student_step(model, batch, lc, model.temperature, world_size=2)
        local = {}
        if rank == 0:  # its align alone: the only generated queries of the global batch
            torch.distributed.destroy_process_group()
            local = student_step(model, batch, lc, model.temperature, world_size=1)[1]
        torch.save({"parts": parts, "local": local}, f"{out}.{rank}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_two_workers_one_without_generated_queries(tokenizer, tmp_path):
    """Two gloo workers, one micro-batch with generated queries (3 with q', 2 with teacher
    scores for them) and one without any: no hang (both join the KD / alignment reduction),
    both log the same global means, and the alignment is worker 0's alone, as a single worker
    computes it on its batch."""
    import socket

    import torch.multiprocessing as mp

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker_step, args=(port, str(tmp_path / "tok"), str(tmp_path / "p")), nprocs=2)
    a, b = (torch.load(tmp_path / f"p.{r}") for r in (0, 1))
    for key in ("kd", "align", "contrastive", "loss"):
        assert a["parts"][key] == pytest.approx(b["parts"][key], abs=1e-6), key
    assert a["parts"]["align"] == pytest.approx(a["local"]["align"], abs=1e-6)
    assert a["parts"]["kd"] != pytest.approx(a["local"]["kd"], abs=1e-4)  # 6 + 4 rows vs 6
