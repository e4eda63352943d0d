"""The teacher's ranking fine-tune in plain torch (no Ray): the training scores are the
teacher scores, and on a toy batch the loss falls and the positive ends up ranked first."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from qgscale.config import ModelConfig
from qgscale.models.generator import QGCollator, QueryGenerator
from qgscale.train.tasks import QGRankCollator, qg_rank_step

T5 = {"model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
      "num_decoder_layers": 1, "num_heads": 4, "feed_forward_proj": "gated-gelu"}


def _toy(n: int = 8, negatives: int = 3) -> dict[str, list]:
    """n queries (5 words of their passage) with their passage first, then ``negatives``
    other passages; the last row has one negative fewer (masked)."""
    from qgscale.data.readers import bundled_xquad_texts

    paras = [" ".join(t.split()[:40]) for t in bundled_xquad_texts(["en"])
             if len(t.split()) > 40][:n]
    rng = random.Random(0)
    rows: dict[str, list] = {"qid": [], "query": [], "lang": [], "passages": []}
    for i, text in enumerate(paras):
        words = text.split()
        start = rng.randrange(0, len(words) - 5)
        k = negatives - (i == n - 1)
        rows["qid"].append(f"q{i}")
        rows["query"].append(" ".join(words[start:start + 5]))
        rows["lang"].append("en")
        rows["passages"].append([text] + [paras[(i + j) % n] for j in range(1, k + 1)])
    return rows


@pytest.fixture
def qg(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    return QueryGenerator.build(ModelConfig(init=T5, tokenizer=str(tmp_path / "tok")),
                                max_passage_len=64, max_query_len=16, seed=0)


def test_collator_layout_and_mask(qg):
    rows = _toy(n=3, negatives=2)
    batch = QGRankCollator(qg.tokenizer, qg.prompt, 64, 16, n_negatives=2)(rows)
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 9  # 3 queries x (1 + 2)
    assert batch["cand_mask"].tolist() == [[True] * 3, [True] * 3, [True, True, False]]
    assert torch.equal(batch["labels"][3], batch["labels"][5])  # query 1 on each of its rows
    first = qg.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert first.startswith("generate en query:")


def test_training_scores_are_the_teacher_scores(qg):
    """sequence_scores (with gradients) == the fast path's log P(q|p) / |q| for the pairs."""
    rows = _toy(n=3, negatives=2)
    batch = QGRankCollator(qg.tokenizer, qg.prompt, 64, 16, n_negatives=2)(rows)
    qg.model.eval()
    sums, ntok = qg(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                    sequence_scores=True)
    assert sums.requires_grad
    pairs = [(q, p, "en") for q, ps in zip(rows["query"], rows["passages"], strict=True)
             for p in ps]
    ref = qg.score(pairs, precision="fp32")
    got = (sums / ntok).detach().numpy()[batch["cand_mask"].flatten().numpy()]
    np.testing.assert_allclose(got, ref.mean, rtol=1e-4, atol=1e-5)


def test_rank_loss_falls_and_ranks_the_positive_first(qg):
    rows = _toy(n=8, negatives=3)
    batch = QGRankCollator(qg.tokenizer, qg.prompt, 64, 16, n_negatives=3)(rows)
    torch.manual_seed(0)
    qg.model.train()
    opt = torch.optim.AdamW(qg.parameters(), lr=3e-3)
    log = []
    for _ in range(40):
        loss, parts = qg_rank_step(qg, batch, gen_weight=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append(parts)
    assert log[0]["pos_first"] < 0.5  # a random teacher: near chance (1 in 4)
    assert log[-1]["rank"] < 0.5 * log[0]["rank"]
    assert log[-1]["loss"] < log[0]["loss"]
    qg.model.eval()
    with torch.no_grad():
        _, parts = qg_rank_step(qg, batch, gen_weight=0.1)
    assert parts["pos_first"] == 1.0  # every query scores its own passage above all others
    # the generation term is the QG training loss on the positives
    pos = QGCollator(qg.tokenizer, qg.prompt, 64, 16)(
        [{"query": q, "lang": "en", "passage": ps[0]}
         for q, ps in zip(rows["query"], rows["passages"], strict=True)])
    with torch.no_grad():
        assert qg(**pos).item() == pytest.approx(parts["gen"], rel=1e-4)
