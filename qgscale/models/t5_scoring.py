"""Teacher scoring forward for T5-family models (T5, mT5): plain torch over the HF modules.

The same weights and layer modules as ``T5ForConditionalGeneration`` (layer norms, feed-forward
blocks, Q/K/V/O projections, relative position bias), with the attention plumbing written for
scoring many queries against few distinct passages:

- the relative position bias and the key padding are folded into one additive bias per batch,
  in the activations' dtype, allocated 16-aligned, so ``scaled_dot_product_attention`` runs a
  fused kernel (cuDNN's on Hopper; the HF path fell back to the unfused fp32 math kernel);
- the decoder's cross-attention keys/values are projected once per distinct passage per layer
  and never copied per query: the queries of a passage are packed into its slots
  (:class:`Slots`), so one attention call serves all of them;
- the LM head runs only on real query tokens, in row chunks each followed by its
  log-sum-exp, so no (tokens, vocabulary) matrix larger than one chunk exists.

:func:`score_batch` is what :func:`qgscale.models.generator.score_pairs` calls for these models;
it equals the HF forward (tests compare them in fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

ALIGN = 16  # fused SDPA kernels want the bias's row stride a multiple of 16 elements
# SDPA kernels to use, in order of priority; None: PyTorch's own choice (cuDNN on Hopper).
SDPA_BACKENDS: list | None = None


def supports(model: nn.Module) -> bool:
    """T5 and mT5 (one relative position bias per stack, shared by its layers)."""
    return getattr(model.config, "model_type", None) in ("t5", "mt5") and hasattr(
        model, "lm_head")


def _aligned(*shape: int, dtype: torch.dtype, device: torch.device, align: int = ALIGN
             ) -> torch.Tensor:
    """A zero tensor of ``shape`` whose last-dim storage is padded to ``align``."""
    last = -(-shape[-1] // align) * align
    return torch.zeros(*shape[:-1], last, dtype=dtype, device=device)[..., :shape[-1]]


def key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, L) additive bias: 0 for real keys, the dtype's minimum for padding (as HF)."""
    out = _aligned(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)
    out.masked_fill_(mask[:, None, None, :] == 0, torch.finfo(dtype).min)
    return out


def _attend(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor,
            kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """T5 attention (no 1/sqrt(d) scaling): self-attention, or cross-attention on ``kv``."""
    b, n, _ = x.shape
    heads, dk = attn.n_heads, attn.key_value_proj_dim
    q = attn.q(x).view(b, n, heads, dk).transpose(1, 2)
    if kv is None:
        k = attn.k(x).view(b, n, heads, dk).transpose(1, 2)
        v = attn.v(x).view(b, n, heads, dk).transpose(1, 2)
    else:
        k, v = kv
    out = _sdpa(q, k, v, bias)
    return attn.o(out.transpose(1, 2).reshape(b, n, heads * dk))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5's attention (no 1/sqrt(d) scaling) with an additive bias, on :data:`SDPA_BACKENDS`."""
    if SDPA_BACKENDS is None or q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def _clamp(x: torch.Tensor) -> torch.Tensor:
    """HF T5's fp16 overflow guard (a no-op in bf16/fp32)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, -limit, limit)


def _act_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def encoder_block(block: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One T5 encoder block: self-attention and feed-forward sublayers, each pre-norm with a
    residual."""
    sa = block.layer[0]
    x = _clamp(x + _attend(sa.SelfAttention, sa.layer_norm(x), bias))
    return _clamp(block.layer[-1](x))


def decoder_block(block: nn.Module, y: torch.Tensor, self_bias: torch.Tensor,
                  enc: torch.Tensor, cross_bias: torch.Tensor, place: torch.Tensor,
                  size: int) -> torch.Tensor:
    """One T5 decoder block: causal self-attention, cross-attention of the targets packed
    into slots (``place``, ``size``: :class:`Slots`) over the slots' encoder rows ``enc``,
    and feed-forward; each pre-norm with a residual."""
    sa, ca = block.layer[0], block.layer[1]
    y = _clamp(y + _attend(sa.SelfAttention, sa.layer_norm(y), self_bias))
    y = _clamp(y + _cross_attend(ca.EncDecAttention, ca.layer_norm(y), enc, cross_bias,
                                 place, size))
    return _clamp(block.layer[-1](y))


class Blocks(NamedTuple):
    """The block functions a forward runs, and the row alignment of the biases it builds."""

    encoder: Callable
    decoder: Callable
    align: int


EAGER = Blocks(encoder_block, decoder_block, ALIGN)


def encode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
           blocks: Blocks = EAGER) -> torch.Tensor:
    """Encoder states (B, L, d) of prompted passages ``ids`` with padding ``mask``;
    ``blocks``: :func:`block_fns` (default: eager)."""
    stack = model.get_encoder()
    x = stack.embed_tokens(ids)
    n = ids.shape[1]
    pos = stack.block[0].layer[0].SelfAttention.compute_bias(n, n, device=ids.device)
    dtype = _act_dtype(x)
    bias = _aligned(ids.shape[0], pos.shape[1], n, n, dtype=dtype, device=ids.device,
                    align=blocks.align)
    torch.add(pos.to(dtype), key_bias(mask, dtype), out=bias)
    for block in stack.block:
        x = blocks.encoder(block, x, bias)
    return stack.final_layer_norm(x)


@dataclass
class Slots:
    """Cross-attention layout of one batch: the targets of an encoder row are packed ``size``
    to a slot, so one attention call per slot reads that row's keys/values directly (no copy
    of them per target, and ``size`` x more query rows per call for the fused kernel)."""

    place: torch.Tensor  # (T,) row of each target in the (n * size) packed layout
    source: torch.Tensor  # (n,) encoder row of each slot
    size: int

    @property
    def n(self) -> int:
        return self.source.shape[0]


def plan_slots(target_source: np.ndarray, n_sources: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(place, slot source, slot size) for targets reading encoder rows ``target_source``.
    The slot size is the mean number of targets per row (1..8); a row with more targets gets
    more slots."""
    target_source = np.asarray(target_source, dtype=np.int64)
    size = int(min(8, max(1, -(-len(target_source) // max(1, n_sources)))))
    counts = np.bincount(target_source, minlength=n_sources)
    per_row = np.maximum(1, -(-counts // size))
    first_slot = np.cumsum(per_row) - per_row
    first_target = np.cumsum(counts) - counts
    order = np.argsort(target_source, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first_target[target_source[order]]
    place = (first_slot[target_source] + rank // size) * size + rank % size
    return place, np.repeat(np.arange(n_sources), per_row), size


def decode(model: nn.Module, enc: torch.Tensor, enc_bias: torch.Tensor, slots: Slots,
           dec_in: torch.Tensor, blocks: Blocks = EAGER) -> torch.Tensor:
    """Decoder states (T, Lt, d) of teacher-forced inputs ``dec_in``; ``slots`` says which
    encoder row each target reads; ``enc_bias`` = :func:`key_bias` of the encoder rows;
    ``blocks``: :func:`block_fns` (default: eager)."""
    stack = model.decoder
    y = stack.embed_tokens(dec_in)
    n = dec_in.shape[1]
    pos = stack.block[0].layer[0].SelfAttention.compute_bias(n, n, device=dec_in.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=dec_in.device).triu(1)
    dtype = _act_dtype(y)
    self_bias = _aligned(1, pos.shape[1], n, n, dtype=dtype, device=dec_in.device,
                         align=blocks.align)
    self_bias.copy_(pos.to(dtype).masked_fill(causal, torch.finfo(dtype).min))
    enc = enc.index_select(0, slots.source)  # once per batch, not per layer
    cross_bias = _aligned(slots.n, 1, 1, enc.shape[1], dtype=enc_bias.dtype, device=enc.device,
                          align=blocks.align)
    cross_bias.copy_(enc_bias.index_select(0, slots.source))
    for block in stack.block:
        y = blocks.decoder(block, y, self_bias, enc, cross_bias, slots.place, slots.size)
    return y


def _cross_attend(attn: nn.Module, x: torch.Tensor, enc: torch.Tensor, bias: torch.Tensor,
                  place: torch.Tensor, size: int) -> torch.Tensor:
    """Cross-attention of targets ``x`` (T, Lt, d) packed ``size`` to a slot at rows
    ``place`` over the slots' encoder rows ``enc`` (n, Ls, d); padding rows of a slot attend
    too and are dropped."""
    n, lt = enc.shape[0], x.shape[1]
    heads, dk = attn.n_heads, attn.key_value_proj_dim
    inner = heads * dk
    q = attn.q(x)
    packed = q.new_zeros(n * size, lt, inner).index_copy_(0, place, q)
    q = packed.view(n, size * lt, heads, dk).transpose(1, 2)
    k = attn.k(enc).view(n, -1, heads, dk).transpose(1, 2)
    v = attn.v(enc).view(n, -1, heads, dk).transpose(1, 2)
    out = _sdpa(q, k, v, bias).transpose(1, 2).reshape(n * size, lt, inner)
    return attn.o(out.index_select(0, place))


def head_scale(model: nn.Module) -> float:
    """The factor HF applies to decoder outputs before the LM head (``d_model ** -0.5`` for
    tied T5 in some releases, 1 otherwise), read off one tiny HF forward and cached: the rule
    differs between transformers releases, so it is measured, not assumed."""
    cached = getattr(model, "_qgscale_head_scale", None)
    if cached is not None:
        return cached
    seen: dict[str, torch.Tensor] = {}
    h1 = model.decoder.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("dec", out[0]))
    h2 = model.lm_head.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("head", args[0]))
    try:
        with torch.inference_mode():
            p = next(model.parameters())
            enc = torch.ones(1, 1, model.config.d_model, dtype=p.dtype, device=p.device)
            start = torch.zeros(1, 1, dtype=torch.long, device=p.device)
            model(encoder_outputs=(enc,), decoder_input_ids=start, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    ratio = (seen["head"].float().norm() / seen["dec"].float().norm()).item()
    scale = model.config.d_model ** -0.5 if abs(ratio - 1.0) > 1e-3 else 1.0
    model._qgscale_head_scale = scale
    return scale


def target_logprobs(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    chunk_elems: int = 1 << 28) -> torch.Tensor:
    """fp32 ``log P(labels[i])`` from decoder states ``hidden`` (N, d) of real target tokens:
    final layer norm and LM head per row chunk, each chunk's logits to ``logprobs``."""
    hidden = model.decoder.final_layer_norm(hidden)
    scale = head_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
    rows = max(1, chunk_elems // model.lm_head.out_features)
    out = [logprobs(model.lm_head(hidden[i:i + rows]), labels[i:i + rows])
           for i in range(0, hidden.shape[0], rows)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def score_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, slots: Slots,
                labels: torch.Tensor, dec_in: torch.Tensor, rows: torch.Tensor,
                logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                blocks: Blocks = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs, real target tokens) per target of one planned batch.

    ``slots``: :func:`plan_slots` as tensors; ``rows``: flat positions of the real tokens in
    ``labels``. Both are computed on the host, so the batch runs without a device-to-host
    sync. ``logprobs(logits, labels)``: fp32 log-probabilities of the labels (the fast
    path's log-sum-exp). ``blocks``: :func:`block_fns` (default: eager).
    """
    enc = encode(model, ids, mask, blocks)
    hidden = decode(model, enc, key_bias(mask, _act_dtype(enc)), slots, dec_in, blocks)
    real = labels.flatten().index_select(0, rows)
    lp = target_logprobs(model, hidden.flatten(0, 1).index_select(0, rows), real, logprobs)
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    out.index_copy_(0, rows, lp)
    return out.view(labels.shape).sum(-1), (labels >= 0).sum(-1)


def block_fns(compiled: bool) -> Blocks:
    """:func:`encoder_block` and :func:`decoder_block`, eager or under ``torch.compile`` with
    dynamic shapes: regional compilation, one graph per block kind for every layer (modules
    are graph inputs) and batch shape, fusing the element-wise work around the matmuls
    (RMSNorm, gated GELU, residual adds) while the batch plan and slot layout, which vary
    per batch, stay outside the graphs. Compiled blocks take contiguous biases (a padded row
    stride would be guarded and recompiled on); inductor aligns them for the fused kernel."""
    return _compiled_blocks() if compiled else EAGER


@functools.cache
def _compiled_blocks() -> Blocks:
    return Blocks(torch.compile(encoder_block, dynamic=True),
                  torch.compile(decoder_block, dynamic=True), 1)
