"""QueryGenerator: a seq2seq model (mT5/T5/BART/...) that writes and scores queries for passages.

Input = the prompt filled with the query language and the passage (title + text), e.g.
``"generate de query: <title> <text>"``; target = the query. One model thus generates and
scores queries in any language. The teacher score of a pair is

    s(q, p) = (1/|q|) * sum_t log P(q_t | prompt(lang(q), p), q_<t)

over the query's target tokens (the tokenizer's ids, including the final ``</s>``), padding
excluded. :func:`score_pairs` is the fast path (plain torch, no Ray): distinct sources are
encoded once and all their queries decoded against the shared encoder output, batches are
length-bucketed and filled to a token budget, under ``torch.inference_mode`` and bf16/fp16
autocast on GPU. :func:`score_naive` is the textbook loop the benchmark compares against.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qgscale import storage
from qgscale.data.schema import passage_text
from qgscale.errors import ConfigError, DataError
from qgscale.models import t5_scoring
from qgscale.models.loading import resolve
from qgscale.models.precision import autocast

DEFAULT_PROMPT = "generate {lang} query: {passage}"
QG_META = "qgscale_qg.json"  # prompt and lengths saved beside the HF files
Pair = tuple[str, str, str]  # (query, passage, query language)


@dataclass
class Scores:
    """Per-pair teacher scores: ``mean`` = ``sum`` / ``ntok`` (mean token log-probability)."""

    mean: np.ndarray
    sum: np.ndarray
    ntok: np.ndarray


# ---------------------------------------------------------------- plain torch scoring functions

def _pad(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    return torch.from_numpy(_pad_np(seqs, value, length))


def _pad_np(seqs: Sequence[Sequence[int]], value: int, length: int | None = None) -> np.ndarray:
    """Right-padded (len(seqs), ``length`` or longest) int64 array, without a per-row loop."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    out = np.full((len(seqs), length or int(lens.max())), value, dtype=np.int64)
    out[np.arange(out.shape[1]) < lens[:, None]] = np.fromiter(
        (t for s in seqs for t in s), dtype=np.int64, count=int(lens.sum()))
    return out


def _decoder_start(model: nn.Module) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("model config has no decoder_start_token_id")
    return int(start)


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                    chunk_elems: int = 1 << 27) -> torch.Tensor:
    """log P(label) per position in fp32 (0 where label == -100), chunked over rows."""
    rows = max(1, chunk_elems // (logits.shape[1] * logits.shape[2]))
    out = []
    for i in range(0, logits.shape[0], rows):
        lg, lb = logits[i:i + rows], labels[i:i + rows]
        lp = _target_logprobs(lg.flatten(0, 1), lb.flatten().clamp(min=0)).view(lb.shape)
        out.append(lp.masked_fill(lb < 0, 0.0))
    return torch.cat(out)


def _logsumexp_fp32(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.float(), -1)


_LSE = {"fn": None}


def _lse(x: torch.Tensor) -> torch.Tensor:
    """fp32 log-sum-exp over the vocabulary. For low-precision CUDA logits a compiled kernel
    reads them once (no fp32 copy of a (N, 250k) matrix); eager elsewhere or if compiling
    fails. Compiled with automatic dynamic shapes: the row count becomes dynamic once it
    varies, the vocabulary size stays static, so the reduction gets a kernel tuned for it
    (marking every dimension dynamic ran it at about 1 TB/s on an H200)."""
    if x.dtype == torch.float32 or x.device.type != "cuda":
        return _logsumexp_fp32(x)
    if _LSE["fn"] is None:
        _LSE["fn"] = torch.compile(_logsumexp_fp32)
    try:
        return _LSE["fn"](x)
    except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so once
        import logging

        logging.getLogger(__name__).warning("compiled log-sum-exp failed (%s); eager", e)
        _LSE["fn"] = _logsumexp_fp32
        return _logsumexp_fp32(x)


def _target_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                     chunk_elems: int = 1 << 28) -> torch.Tensor:
    """``log P(labels[i])`` from logit rows ``logits[i]`` (N, V), in fp32, chunked over rows."""
    rows = max(1, chunk_elems // logits.shape[-1])
    out = []
    for i in range(0, logits.shape[0], rows):
        lg = logits[i:i + rows]
        target = lg.gather(-1, labels[i:i + rows, None]).squeeze(-1).float()
        out.append(target - _lse(lg))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


@contextmanager
def _logits_at(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Run the LM head only on flat decoder positions ``rows`` (real target tokens).

    A forward pre-hook on the output embedding turns its (B, T, d) input into (N, d), so the
    model returns (N, V) logits: no vocabulary projection (the largest matmul of mT5) or
    log-softmax for padding. Works for any head applied per position (T5, BART, BERT2BERT).
    """
    head = model.get_output_embeddings()

    def select(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def _cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"


def _cross_attentions(model: nn.Module) -> list[tuple[int, nn.Module, nn.Module, int]] | None:
    """``(layer index, key proj, value proj, head dim)`` of each decoder cross-attention, for
    decoders whose cross-attention reads a pre-filled ``EncoderDecoderCache``: T5-family (T5,
    mT5) and BERT-style decoders (``EncoderDecoderModel``, e.g. BERT2BERT); else None."""
    blocks = getattr(getattr(model, "decoder", None), "block", None)
    if blocks is not None and all(hasattr(b.layer[1], "EncDecAttention") for b in blocks):
        return [(i, b.layer[1].EncDecAttention.k, b.layer[1].EncDecAttention.v,
                 b.layer[1].EncDecAttention.key_value_proj_dim) for i, b in enumerate(blocks)]
    bert = getattr(getattr(model, "decoder", None), "bert", None)
    layers = getattr(getattr(bert, "encoder", None), "layer", None)
    if layers is not None and all(hasattr(layer, "crossattention") for layer in layers):
        atts = [layer.crossattention.self for layer in layers]
        return [(a.layer_idx, a.key, a.value, a.attention_head_size) for a in atts]
    return None


def _cross_cache(model: nn.Module, enc: torch.Tensor, index: torch.Tensor) -> Any | None:
    """Cross-attention keys/values computed once per distinct source, expanded to the targets
    (see :func:`_cross_attentions`); ``None`` for other architectures (they get expanded
    encoder states instead, so the K/V projections run once per target)."""
    layers = _cross_attentions(model)
    if layers is None:
        return None
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    proj = getattr(model, "enc_to_dec_proj", None)  # an encoder wider or narrower than the
    if proj is not None:  # decoder: EncoderDecoderModel.forward projects its states first
        enc = proj(enc)

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for i, key, value, head_dim in layers:
        shape = (*enc.shape[:-1], -1, head_dim)
        k = key(enc).view(shape).transpose(1, 2).index_select(0, index)
        v = value(enc).view(shape).transpose(1, 2).index_select(0, index)
        cache.cross_attention_cache.update(k, v, i)
        cache.is_updated[i] = True
    return cache


def _decode_scores(model: nn.Module, enc: torch.Tensor, enc_mask: torch.Tensor,
                   index: torch.Tensor, targets: Sequence[Sequence[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target log-probs and token counts; target i reads source ``index[i]``."""
    labels = _pad(targets, -100).to(enc.device)
    dec_in = _decoder_inputs(model, labels)
    mask = enc_mask.index_select(0, index)
    cache = _cross_cache(model, enc, index)
    real = labels >= 0
    rows = real.flatten().nonzero().squeeze(-1)
    with _logits_at(model, rows):
        if cache is None:
            out = model(encoder_outputs=(enc.index_select(0, index),), attention_mask=mask,
                        decoder_input_ids=dec_in, use_cache=False)
        else:  # encoder states only give the mask its shape: K/V come from the cache
            out = model(encoder_outputs=(enc[:1].expand(len(index), -1, -1),),
                        attention_mask=mask, decoder_input_ids=dec_in, use_cache=True,
                        **{_cache_kwarg(model): cache})
    lp = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    lp[real] = _target_logprobs(out.logits, labels[real])
    return lp.sum(-1), real.sum(-1)


def _decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing decoder inputs: the start token, then the labels shifted right."""
    dec_in = labels.new_full(labels.shape, _decoder_start(model))
    dec_in[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] < 0, model.config.pad_token_id)
    return dec_in


@dataclass
class Batch:
    """One forward pass: distinct sources, and for each target the source it is decoded with."""

    sources: list[int]  # indices into the source list
    targets: list[int]  # indices into the pair list
    target_source: list[int] = field(default_factory=list)  # position in ``sources`` per target


def plan_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], pair_src: Sequence[int],
                 batch_tokens: int, group: bool = True) -> list[Batch]:
    """Length-bucketed batches filled to ``batch_tokens`` padded tokens (encoder + decoder).

    Pairs are grouped by source (``group``: a source is encoded once per batch and all its
    targets decode against it) and sorted by source length, then target length, so padding
    stays small. A source with more targets than fit in one batch is split over batches.
    Without ``group`` every pair carries its own copy of its source (plain bucketed path).
    """
    by_src: dict[int, list[int]] = {}
    for j, s in enumerate(pair_src):
        by_src.setdefault(s if group else -1 - j, []).append(j)
    keys = sorted(by_src, key=lambda k: (src_lens[pair_src[by_src[k][0]]], k))
    batches: list[Batch] = []
    cur, ls, lt = Batch([], []), 0, 0

    def cost(n_src: int, ls_: int, n_tgt: int, lt_: int) -> int:
        return n_src * ls_ + n_tgt * lt_

    for k in keys:
        members = sorted(by_src[k], key=lambda j: tgt_lens[j])
        s = pair_src[members[0]]
        while members:
            new_ls = max(ls, src_lens[s])
            # How many of this source's targets fit next to the current batch?
            n = 0
            while n < len(members) and cost(
                    len(cur.sources) + 1, new_ls, len(cur.targets) + n + 1,
                    max(lt, tgt_lens[members[n]])) <= batch_tokens:
                n += 1
            if n == 0 and cur.targets:  # start a new batch
                batches.append(cur)
                cur, ls, lt = Batch([], []), 0, 0
                continue
            n = max(n, 1)  # a single pair over budget still runs, alone
            cur.sources.append(s)
            for j in members[:n]:
                cur.targets.append(j)
                cur.target_source.append(len(cur.sources) - 1)
                lt = max(lt, tgt_lens[j])
            ls = new_ls
            members = members[n:]
    if cur.targets:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_pairs(model: nn.Module, sources: Sequence[Sequence[int]],
                targets: Sequence[Sequence[int]], pair_src: Sequence[int], *,
                batch_tokens: int = 16384, precision: str = "bf16", group: bool = True,
                pad_id: int = 0, compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fast path: (sum log P, ntok) of ``targets[j]`` given ``sources[pair_src[j]]``.

    ``sources``/``targets`` are token id lists (already truncated). The encoder runs once per
    distinct source per batch. T5 and mT5 run :mod:`qgscale.models.t5_scoring` (fused
    attention, cross-attention K/V once per source, LM head on real tokens; ``compiled``:
    its encoder and decoder blocks under ``torch.compile``); other models run the HF forward with
    the decoder's cross-attention K/V computed once per source where the architecture allows
    (:func:`_cross_cache`), else against the encoder output expanded to the targets.
    """
    device = next(model.parameters()).device
    sums = np.zeros(len(targets), dtype=np.float64)
    ntok = np.zeros(len(targets), dtype=np.int64)
    src_lens = [len(s) for s in sources]
    tgt_lens = [len(t) for t in targets]
    t5 = t5_scoring.supports(model)
    blocks = t5_scoring.block_fns(t5 and compiled)
    pending: list[tuple[Batch, torch.Tensor, torch.Tensor]] = []
    for b in plan_batches(src_lens, tgt_lens, pair_src, batch_tokens, group):
        ids = _to_device(_pad_np([sources[s] for s in b.sources], pad_id), device)
        mask = (ids != pad_id).long()
        with autocast(device, precision):
            if t5:  # no host sync: the next batch is prepared while this one runs
                place, slot_src, size = t5_scoring.plan_slots(b.target_source, len(b.sources))
                slots = t5_scoring.Slots(_to_device(place, device),
                                         _to_device(slot_src, device), size)
                labels = _pad_np([targets[j] for j in b.targets], -100)
                rows = _to_device(np.flatnonzero(labels.ravel() >= 0), device)
                labels = _to_device(labels, device)
                s, n = t5_scoring.score_batch(model, ids, mask, slots, labels,
                                              _decoder_inputs(model, labels), rows,
                                              _target_logprobs, blocks)
            else:
                index = torch.as_tensor(b.target_source, device=device)
                enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                s, n = _decode_scores(model, enc, mask, index, [targets[j] for j in b.targets])
        pending.append((b, s, n))
        if len(pending) > 1:
            _collect(pending.pop(0), sums, ntok)
    for item in pending:
        _collect(item, sums, ntok)
    return sums, ntok


def _collect(item: tuple[Batch, torch.Tensor, torch.Tensor], sums: np.ndarray,
             ntok: np.ndarray) -> None:
    b, s, n = item
    sums[b.targets] = s.cpu().numpy()
    ntok[b.targets] = n.cpu().numpy()


def _to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to ``device``; on CUDA through pinned memory, so the copy is asynchronous."""
    t = torch.from_numpy(x)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@torch.inference_mode()
def score_naive(model: nn.Module, sources: Sequence[Sequence[int]],
                targets: Sequence[Sequence[int]], pair_src: Sequence[int], *,
                batch_size: int = 32, max_source_len: int = 256, max_target_len: int = 64,
                pad_id: int = 0, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Baseline: fixed batches in input order, padded to the max lengths, no grouping, logits
    at every position (``precision``: autocast on CUDA as in :func:`score_pairs`)."""
    device = next(model.parameters()).device
    sums = np.zeros(len(targets), dtype=np.float64)
    ntok = np.zeros(len(targets), dtype=np.int64)
    for i in range(0, len(targets), batch_size):
        js = range(i, min(i + batch_size, len(targets)))
        ids = _pad([sources[pair_src[j]] for j in js], pad_id, max_source_len).to(device)
        labels = _pad([targets[j] for j in js], -100, max_target_len).to(device)
        with autocast(device, precision):
            out = model(input_ids=ids, attention_mask=(ids != pad_id).long(),
                        decoder_input_ids=_decoder_inputs(model, labels), use_cache=False)
        lp = _token_logprobs(out.logits, labels)
        sums[i:i + len(js)] = lp.sum(-1).double().cpu().numpy()
        ntok[i:i + len(js)] = (labels >= 0).sum(-1).cpu().numpy()
    return sums, ntok


@torch.inference_mode()
def generate_ids(model: nn.Module, input_ids: torch.Tensor, pad_id: int, *, num_queries: int = 1,
                 do_sample: bool = False, num_beams: int = 1, top_p: float = 0.95,
                 max_new_tokens: int = 32, min_new_tokens: int | None = None,
                 precision: str = "bf16") -> torch.Tensor:
    """Query token ids for a batch of prompted passages (``num_queries`` rows per passage)."""
    with autocast(input_ids.device, precision):
        return model.generate(
            input_ids=input_ids, attention_mask=(input_ids != pad_id).long(),
            do_sample=do_sample, num_beams=num_beams, top_p=top_p if do_sample else None,
            num_return_sequences=num_queries, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens)


FP16_OVERFLOWS = ("t5", "mt5", "umt5")  # model types whose activations overflow fp16


def check_precision(model: nn.Module, precision: str, setting: str) -> None:
    """A ConfigError naming ``setting`` for fp16 with a T5-family model: their feed-forward
    outputs overflow fp16 (HF keeps ``wo`` in fp32 for it; T5's clamp then turns the overflow
    into large finite values, so scores would look normal and be wrong)."""
    kind = getattr(getattr(model, "config", None), "model_type", "")
    if precision == "fp16" and kind in FP16_OVERFLOWS:
        raise ConfigError(f"{setting}=fp16 with a {kind} model: T5-family activations "
                          "overflow fp16; use bf16, or fp32 on a GPU without bf16")


def prepare_for_inference(model: nn.Module, device: torch.device | str,
                          precision: str = "bf16", setting: str = "precision") -> nn.Module:
    """Ready a QG for scoring/generation: on ``device``, weights cast to bf16/fp16 on CUDA
    (autocast over fp32 weights re-casts every weight on every forward and keeps the residual
    stream in fp32), T5's RMSNorm and tanh-GELU swapped for PyTorch's fused kernels (the same
    functions: ``nn.RMSNorm``, ``nn.GELU(approximate="tanh")``). In place; returns ``model``.
    On CUDA, fp16 with a T5-family model is a ConfigError naming ``setting``
    (:func:`check_precision`); on CPU the weights stay fp32 whatever ``precision`` says.
    """
    from transformers.activations import NewGELUActivation

    device = torch.device(device)
    if device.type == "cuda":
        check_precision(model, precision, setting)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child).__name__ in ("T5LayerNorm", "MT5LayerNorm"):
                fused = nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon,
                                   device=child.weight.device, dtype=child.weight.dtype)
                fused.weight = child.weight
                setattr(parent, name, fused)
            elif isinstance(child, NewGELUActivation):
                setattr(parent, name, nn.GELU(approximate="tanh"))
    model.to(device)
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    return model.eval()


def _warm_start(init: dict[str, Any], tokenizer: str | None, seed: int) -> tuple[Any, Any]:
    """An ``EncoderDecoderModel`` from pretrained encoder-only checkpoints (BERT2BERT).

    ``cross_attention``: ``new`` (random, as in HF) or ``self``: each decoder layer's
    cross-attention starts as a copy of its own pretrained self-attention, so that query
    tokens attend to passage tokens by the checkpoint's similarity from the first step."""
    from transformers import AutoTokenizer, EncoderDecoderModel

    init.pop("model_type")
    cross = init.pop("cross_attention", "new")
    if cross not in ("new", "self"):
        raise ConfigError(f"model.init.cross_attention: {cross!r}: expected new or self")
    try:
        encoder, decoder = resolve(init.pop("encoder")), resolve(init.pop("decoder"))
    except KeyError as e:
        raise ConfigError(f"model.init (encoder-decoder): missing {e.args[0]!r}") from None
    tok = AutoTokenizer.from_pretrained(resolve(tokenizer) if tokenizer else encoder)
    torch.manual_seed(seed)  # the new cross-attention weights
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder, decoder, **init)
    if cross == "self":
        layers = [m for m in model.decoder.modules() if hasattr(m, "crossattention")]
        if not layers:
            raise ConfigError(f"{decoder}: no BERT-style decoder layers (crossattention) to "
                              "copy self-attention into")
        for layer in layers:
            layer.crossattention.load_state_dict(layer.attention.state_dict())
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if start is None or start == tok.pad_token_id:
        raise ConfigError(f"{encoder}: tokenizer has no start token other than padding")
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = (
            start, tok.pad_token_id, end)
    model.config.vocab_size = model.config.decoder.vocab_size
    return model.eval(), tok


def saved_meta(path: str) -> dict[str, Any]:
    """The prompt and lengths saved beside a QG in local folder ``path`` (``qgscale_qg.json``,
    :meth:`QueryGenerator.save_pretrained`); {} for a model saved otherwise."""
    if not os.path.exists(os.path.join(path, QG_META)):
        return {}
    with open(os.path.join(path, QG_META)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------- the model

class QueryGenerator(nn.Module):
    """An HF seq2seq model + tokenizer + language prompt; ``forward(**batch)`` is the QG loss."""

    def __init__(self, model: nn.Module, tokenizer: Any, prompt: str = DEFAULT_PROMPT,
                 max_passage_len: int = 256, max_query_len: int = 64):
        super().__init__()
        if "{passage}" not in prompt or "{lang}" not in prompt:
            raise ConfigError(f"qg.prompt {prompt!r} must contain {{lang}} and {{passage}}")
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ConfigError(f"qg.model: {type(model).__name__} is not an encoder-decoder "
                              "(seq2seq) model")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_passage_len = max_passage_len
        self.max_query_len = max_query_len

    # ---- construction and persistence
    @classmethod
    def from_pretrained(cls, name_or_path: str, tokenizer: str | None = None,
                        prompt: str | None = None, **model_kwargs: Any) -> QueryGenerator:
        """Load from a hub id, local path, ``pkg:`` folder or fsspec URI (``s3://...``)."""
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        path = resolve(name_or_path)
        meta = saved_meta(path)
        if prompt:
            meta["prompt"] = prompt
        model_kwargs.setdefault("dtype", torch.float32)  # not the config's: fp32 masters
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **model_kwargs).eval()
        tok = AutoTokenizer.from_pretrained(resolve(tokenizer) if tokenizer else path)
        return cls(model, tok, **meta)

    @classmethod
    def build(cls, model_cfg: Any, prompt: str = DEFAULT_PROMPT, max_passage_len: int = 256,
              max_query_len: int = 64, seed: int = 0) -> QueryGenerator:
        """From a :class:`qgscale.config.ModelConfig`: load ``name_or_path``, or build ``init``
        (HF config kwargs incl. ``model_type``) with random weights seeded by ``seed``.

        ``init: {model_type: encoder-decoder, encoder: PATH, decoder: PATH}`` warm-starts an
        ``EncoderDecoderModel`` from pretrained encoder checkpoints (e.g. BERT2BERT from the
        demo's MiniLM: encoder and decoder initialised from it, cross-attention new; other
        keys such as ``decoder_num_hidden_layers`` go to ``from_encoder_decoder_pretrained``).
        """
        lens = dict(max_passage_len=max_passage_len, max_query_len=max_query_len)
        if model_cfg.name_or_path:
            qg = cls.from_pretrained(model_cfg.name_or_path, model_cfg.tokenizer,
                                     prompt=prompt)
            qg.max_passage_len, qg.max_query_len = max_passage_len, max_query_len
            return qg
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

        if (model_cfg.init or {}).get("model_type") == "encoder-decoder":
            model, tok = _warm_start(dict(model_cfg.init), model_cfg.tokenizer, seed)
            return cls(model, tok, prompt, **lens)
        if not model_cfg.tokenizer:
            raise ConfigError("model.init needs model.tokenizer (a tokenizer path or hub id)")
        tok = AutoTokenizer.from_pretrained(resolve(model_cfg.tokenizer))
        kwargs = dict(model_cfg.init)
        model_type = kwargs.pop("model_type", "t5")
        kwargs.setdefault("vocab_size", len(tok))
        kwargs.setdefault("pad_token_id", tok.pad_token_id)
        kwargs.setdefault("eos_token_id", tok.eos_token_id)
        kwargs.setdefault("decoder_start_token_id", tok.pad_token_id)
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(seed)
        model = AutoModelForSeq2SeqLM.from_config(config).eval()
        return cls(model, tok, prompt, **lens)

    def save_pretrained(self, uri: str) -> None:
        """Write HF model + tokenizer + ``qgscale_qg.json`` to a local path or fsspec URI."""
        meta = {"prompt": self.prompt, "max_passage_len": self.max_passage_len,
                "max_query_len": self.max_query_len}
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.url_to_fs(uri)[1] if storage.is_local(uri) else tmp
            self.model.save_pretrained(local)
            self.tokenizer.save_pretrained(local)
            with open(os.path.join(local, QG_META), "w") as f:
                json.dump(meta, f, indent=2)
            if not storage.is_local(uri):
                storage.upload_dir(tmp, uri)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- tokenization
    def source(self, passage: str, lang: str) -> str:
        return self.prompt.format(lang=lang, passage=passage)

    def tokenize(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), truncation=True, max_length=max_len,
                              add_special_tokens=True)["input_ids"]

    def _prepare(self, pairs: Sequence[Pair]
                 ) -> tuple[list[list[int]], list[list[int]], list[int]]:
        src_index: dict[str, int] = {}
        pair_src = []
        for _, p, lang in pairs:
            pair_src.append(src_index.setdefault(self.source(p, lang), len(src_index)))
        sources = self.tokenize(list(src_index), self.max_passage_len)
        targets = self.tokenize([q for q, _, _ in pairs], self.max_query_len)
        return sources, targets, pair_src

    # ---- scoring and generation
    def score(self, pairs: Sequence[Pair], *, batch_tokens: int = 16384,
              precision: str = "bf16", fast: bool = True, group: bool = True,
              batch_size: int = 32) -> Scores:
        """Teacher scores of ``(query, passage, query_lang)`` pairs (see module docstring).

        ``fast`` (default): :func:`score_pairs` (``group`` False disables passage grouping);
        else :func:`score_naive` with ``batch_size``.
        """
        if not pairs:
            return Scores(np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
        sources, targets, pair_src = self._prepare(pairs)
        pad = self.tokenizer.pad_token_id
        if fast:
            sums, ntok = score_pairs(self.model, sources, targets, pair_src, pad_id=pad,
                                     batch_tokens=batch_tokens, precision=precision,
                                     group=group)
        else:
            sums, ntok = score_naive(self.model, sources, targets, pair_src, pad_id=pad,
                                     batch_size=batch_size, max_source_len=self.max_passage_len,
                                     max_target_len=self.max_query_len)
        return Scores(sums / np.maximum(ntok, 1), sums, ntok)

    @torch.inference_mode()
    def generate(self, passages: Sequence[str], lang: str, *, num_queries: int = 1,
                 do_sample: bool = False, num_beams: int = 1, top_p: float = 0.95,
                 max_new_tokens: int = 32, batch_size: int = 32, precision: str = "bf16",
                 seed: int | None = None) -> list[list[tuple[str, float]]]:
        """``num_queries`` queries in ``lang`` per passage, each with its teacher score.

        Beam search (``num_beams >= num_queries``) or nucleus sampling (``do_sample``); the
        returned log-prob is the mean token log-prob of the decoded query (:meth:`score`), so it
        is comparable with teacher scores. ``seed`` makes sampling reproducible.
        """
        if not do_sample and num_beams < num_queries:
            raise ConfigError(f"num_queries={num_queries} needs num_beams >= num_queries "
                             f"(got {num_beams}) or do_sample=true")
        if seed is not None:
            torch.manual_seed(seed)
        order = sorted(range(len(passages)), key=lambda i: len(passages[i]))
        texts: list[list[str]] = [[] for _ in passages]
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids = _pad(self.tokenize([self.source(passages[i], lang) for i in idx],
                                     self.max_passage_len), pad).to(self.device)
            out = generate_ids(self.model, ids, pad, num_queries=num_queries,
                               do_sample=do_sample, num_beams=num_beams, top_p=top_p,
                               max_new_tokens=max_new_tokens, precision=precision)
            decoded = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            for k, i in enumerate(idx):
                texts[i] = [d.strip() for d in decoded[k * num_queries:(k + 1) * num_queries]]
        pairs = [(q, passages[i], lang) for i in range(len(passages)) for q in texts[i]]
        means = iter(self.score(pairs, precision=precision).mean.tolist())
        return [[(q, next(means)) for q in texts[i]] for i in range(len(passages))]

    # ---- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, sequence_scores: bool = False, **_: Any) -> Any:
        """Seq2seq cross-entropy of a :class:`QGCollator` batch (mean over target tokens);
        ``sequence_scores``: per row (sum of target log-probs, target token count) instead,
        differentiable (:func:`sequence_logprobs`: the teacher's ranking fine-tune)."""
        if sequence_scores:
            return sequence_logprobs(self.model, input_ids, attention_mask, labels)
        return qg_loss(self.model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                    "labels": labels})


# ------------------------------------------------------------------------ QG fine-tuning data

@dataclass
class QGCollator:
    """Rows ``{query, lang, passage}`` (or ``title``+``text`` instead of ``passage``) ->
    ``input_ids``, ``attention_mask`` (prompted passages) and ``labels`` (query ids, -100 pad).
    """

    tokenizer: Any
    prompt: str = DEFAULT_PROMPT
    max_passage_len: int = 256
    max_query_len: int = 64

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sources, queries = [], []
        for i, r in enumerate(rows):
            for key in ("query", "lang"):
                if not r.get(key):
                    raise DataError(f"QG training row {i}: field {key!r} missing or empty")
            passage = r.get("passage") or passage_text(r.get("title"), r.get("text") or "")
            if not passage:
                raise DataError(f"QG training row {i}: no passage text")
            sources.append(self.prompt.format(lang=r["lang"], passage=passage))
            queries.append(r["query"])
        enc = self.tokenizer(sources, truncation=True, max_length=self.max_passage_len,
                             padding=True, return_tensors="pt")
        tgt = self.tokenizer(queries, truncation=True, max_length=self.max_query_len,
                             padding=True, return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}


def qg_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """L = -(1/N) sum_{i,t} log P(y_it | x_i, y_i,<t) over the N non-pad target tokens.

    From :func:`sequence_logprobs`: the LM head runs on the N real positions only, and HF's
    own loss over every (padded) position is not computed (with mT5's 250k vocabulary each
    fp32 copy of the full logits is about 1 GB per 1,000 target positions)."""
    sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                     batch["labels"])
    return -sums.sum() / counts.sum().clamp(min=1)


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of ``log P(labels_t | source, labels_<t)`` over the real (``>= 0``)
    labels, and their count, with gradients (training; :func:`score_pairs` is the
    inference path). Like the fast path, the LM head runs only on real target positions."""
    real = labels >= 0
    rows = real.flatten().nonzero().squeeze(-1)
    with _logits_at(model, rows):
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    decoder_input_ids=_decoder_inputs(model, labels), use_cache=False)
    logits = out.logits.float()  # (N real tokens, V)
    lp = logits.gather(-1, labels[real][:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    sums = lp.new_zeros(labels.shape[0]).index_add(0, rows // labels.shape[1], lp)
    return sums, real.sum(-1)


def qg_examples(queries: Any, corpus: Any, qrels: Any, qrels_uri: str = "qrels",
                queries_uri: str = "queries", corpus_uri: str = "corpus"
                ) -> Iterator[dict[str, str]]:
    """QG training rows ``{query, lang, passage}`` from canonical tables (rel > 0 pairs).

    ``lang`` is the query's language (the language the QG must write in). A pair whose qid
    or pid is missing from its table, a (qid, pid) pair on two rows, or a pid on two corpus
    rows, is a DataError naming the table (``*_uri``), as the Ray Data rows
    (:mod:`qgscale.train.rows_dataset`) do.
    """
    qs = {r["qid"]: r for r in queries.to_pylist()}
    ps: dict[str, dict] = {}
    for r in corpus.to_pylist():
        if r["pid"] in ps:
            raise DataError(f"{corpus_uri}: pid={r['pid']} is on two corpus rows: a pid names "
                            "one passage")
        ps[r["pid"]] = r
    seen: set[tuple[str, str]] = set()
    for r in qrels.to_pylist():
        if (r["rel"] or 0) <= 0:
            continue
        where = f"{qrels_uri}: qid={r['qid']}"
        if r["qid"] not in qs:
            raise DataError(f"{where}: qid={r['qid']} not in queries {queries_uri}")
        if r["pid"] not in ps:
            raise DataError(f"{where}: pid={r['pid']} not in corpus {corpus_uri}")
        if (r["qid"], r["pid"]) in seen:
            raise DataError(f"{qrels_uri}: qid={r['qid']}, pid={r['pid']} has two rows (one "
                            "row per (qid, pid) pair)")
        seen.add((r["qid"], r["pid"]))
        q, p = qs[r["qid"]], ps[r["pid"]]
        yield {"query": q["text"], "lang": q["lang"],
               "passage": passage_text(p["title"], p["text"])}
