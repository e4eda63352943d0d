"""Teacher scoring forward for T5-family models (T5, mT5): plain torch over the HF modules.

The same weights and layer modules as ``T5ForConditionalGeneration`` (layer norms, feed-forward
blocks, Q/K/V/O projections, relative position bias), with the attention plumbing written for
scoring many queries against few distinct passages:

- the relative position bias and the key padding are folded into one additive bias per batch,
  in the activations' dtype, allocated 16-aligned, so ``scaled_dot_product_attention`` can use
  its fused memory-efficient kernel (the HF path fell back to the unfused math kernel);
- the decoder's cross-attention keys/values are projected once per distinct passage per layer
  and gathered to its queries (one layer at a time, not all layers' caches at once);
- the LM head runs only on real query tokens, in row chunks fused with the log-softmax, so
  no (tokens, vocabulary) matrix larger than one chunk exists.

:func:`score_batch` is what :func:`qgscale.models.generator.score_pairs` calls for these models;
it equals the HF forward (tests compare them in fp32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

ALIGN = 16  # fused SDPA kernels want the bias's row stride a multiple of 16 elements


def supports(model: nn.Module) -> bool:
    """T5 and mT5 (one relative position bias per stack, shared by its layers)."""
    return getattr(model.config, "model_type", None) in ("t5", "mt5") and hasattr(
        model, "lm_head")


def _aligned(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor of ``shape`` whose last-dim storage is padded to :data:`ALIGN`."""
    last = -(-shape[-1] // ALIGN) * ALIGN
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
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return attn.o(out.transpose(1, 2).reshape(b, n, heads * dk))


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


def encode(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Encoder states (B, L, d) of prompted passages ``ids`` with padding ``mask``."""
    stack = model.get_encoder()
    x = stack.embed_tokens(ids)
    n = ids.shape[1]
    pos = stack.block[0].layer[0].SelfAttention.compute_bias(n, n, device=ids.device)
    dtype = _act_dtype(x)
    bias = _aligned(ids.shape[0], pos.shape[1], n, n, dtype=dtype, device=ids.device)
    bias.copy_(pos.to(dtype) + key_bias(mask, dtype))
    for block in stack.block:
        sa = block.layer[0]
        x = _clamp(x + _attend(sa.SelfAttention, sa.layer_norm(x), bias))
        x = _clamp(block.layer[-1](x))
    return stack.final_layer_norm(x)


def decode(model: nn.Module, enc: torch.Tensor, enc_bias: torch.Tensor, index: torch.Tensor,
           dec_in: torch.Tensor) -> torch.Tensor:
    """Decoder states (T, Lt, d) of teacher-forced inputs ``dec_in``; target i reads encoder
    row ``index[i]``; ``enc_bias`` = :func:`key_bias` of the encoder rows."""
    stack = model.decoder
    y = stack.embed_tokens(dec_in)
    n = dec_in.shape[1]
    pos = stack.block[0].layer[0].SelfAttention.compute_bias(n, n, device=dec_in.device)
    causal = torch.ones(n, n, dtype=torch.bool, device=dec_in.device).triu(1)
    dtype = _act_dtype(y)
    self_bias = _aligned(1, pos.shape[1], n, n, dtype=dtype, device=dec_in.device)
    self_bias.copy_(pos.to(dtype).masked_fill(causal, torch.finfo(dtype).min))
    s, ls = enc.shape[:2]
    cross_bias = _aligned(len(index), 1, 1, ls, dtype=enc_bias.dtype, device=enc.device)
    cross_bias.copy_(enc_bias.index_select(0, index))
    for block in stack.block:
        sa, ca = block.layer[0], block.layer[1]
        y = _clamp(y + _attend(sa.SelfAttention, sa.layer_norm(y), self_bias))
        att = ca.EncDecAttention
        heads, dk = att.n_heads, att.key_value_proj_dim
        k = att.k(enc).view(s, ls, heads, dk).transpose(1, 2).index_select(0, index)
        v = att.v(enc).view(s, ls, heads, dk).transpose(1, 2).index_select(0, index)
        y = _clamp(y + _attend(att, ca.layer_norm(y), cross_bias, (k, v)))
        y = _clamp(block.layer[-1](y))
    return y


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
                    lse: Callable[[torch.Tensor], torch.Tensor],
                    chunk_elems: int = 1 << 28) -> torch.Tensor:
    """fp32 ``log P(labels[i])`` from decoder states ``hidden`` (N, d) of real target tokens:
    final layer norm and LM head per row chunk, log-sum-exp by ``lse``."""
    hidden = model.decoder.final_layer_norm(hidden)
    scale = head_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
    rows = max(1, chunk_elems // model.lm_head.out_features)
    out = []
    for i in range(0, hidden.shape[0], rows):
        logits = model.lm_head(hidden[i:i + rows])
        target = logits.gather(-1, labels[i:i + rows, None]).squeeze(-1).float()
        out.append(target - lse(logits))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def score_batch(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor,
                labels: torch.Tensor, dec_in: torch.Tensor, rows: torch.Tensor,
                lse: Callable[[torch.Tensor], torch.Tensor],
                encode_fn: Callable = encode, decode_fn: Callable = decode
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs, real target tokens) per target of one planned batch.

    ``rows``: flat positions of the real tokens in ``labels`` (computed on the host, so the
    batch runs without a device-to-host sync). ``encode_fn``/``decode_fn``: :func:`encode`/
    :func:`decode` or compiled versions of them.
    """
    enc = encode_fn(model, ids, mask)
    hidden = decode_fn(model, enc, key_bias(mask, _act_dtype(enc)), index, dec_in)
    real = labels.flatten().index_select(0, rows)
    lp = target_logprobs(model, hidden.flatten(0, 1).index_select(0, rows), real, lse)
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
    out.index_copy_(0, rows, lp)
    return out.view(labels.shape).sum(-1), (labels >= 0).sum(-1)
