"""Tiny models and tokenizers built in-process (tests, demos, benchmarks; no network)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SPECIALS = ["<pad>", "</s>", "<unk>", "<cls>", "<sep>", "<mask>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A multilingual BPE tokenizer trained on ``texts`` (seconds on a few MB).

    Ids: <pad>=0, </s>=1, <unk>=2, <cls>=3, <sep>=4, <mask>=5, as T5 expects for pad/eos;
    every encoded text ends with </s>.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  limit_alphabet=3000)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(  # T5-style: append </s>
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", cls_token="<cls>", sep_token="<sep>",
                                   mask_token="<mask>")


def xquad_texts(limit_langs: list[str] | None = None) -> list[str]:
    """Paragraphs and questions of the bundled XQuAD files (tokenizer training text)."""
    from qgscale.data.readers import bundled_xquad_texts

    return bundled_xquad_texts(limit_langs)


def tiny_t5_config(vocab_size: int, d_model: int = 64, layers: int = 2, heads: int = 4,
                   d_ff: int = 128) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff,
                    num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def tiny_t5(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **kw) -> T5ForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), **kw)).eval()


def tiny_bert_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_len: int = 512) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=hidden * 2,
                      max_position_embeddings=max_len, pad_token_id=0)


def tiny_bert(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **kw) -> BertModel:
    import torch

    torch.manual_seed(seed)
    return BertModel(tiny_bert_config(len(tokenizer), **kw), add_pooling_layer=False).eval()
