"""Corpus encoding: Ray actors turn CORPUS shards into embedding shards
``{pid, lang, vector}`` (``lang`` goes on into the index's id map).

The fast path is plain torch (:func:`encode_texts`: length bucketing + autocast) so a GPU box
without Ray can run it; :class:`EncodeJob` wraps it for :func:`qgscale.runtime.run_shards`,
which :func:`encode_corpus` runs over the corpus shards: every embedding shard is written
atomically with a done marker (:class:`qgscale.storage.ShardWriter`); a re-run skips finished
shards and a killed actor's shard is redone on a fresh one.
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from qgscale import storage
from qgscale.config import EncodeConfig
from qgscale.data.schema import CORPUS, embeddings_schema, passage_text
from qgscale.errors import DataError
from qgscale.models.precision import autocast, default_device
from qgscale.runtime import Shard, actor_device, run_shards


class TextEncoder(Protocol):
    """What :func:`encode_texts` callers need (``qgscale.models.encoder.DualEncoder``)."""

    tokenizer: Any

    def encode_passages(self, texts: list[str], batch_size: int) -> torch.Tensor: ...

    def encode_queries(self, texts: list[str], batch_size: int) -> torch.Tensor: ...


# ---------------------------------------------------------------- plain torch fast path
def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length (longest first), so padding is minimal."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if tokenizer is None:
        return [len(t) for t in texts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@torch.inference_mode()
def encode_texts(encode_fn: Callable[[list[str], int], torch.Tensor], texts: list[str],
                 batch_size: int, lengths: Sequence[int] | None = None,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> np.ndarray:
    """Encode ``texts`` in length-sorted batches under autocast; rows in input order (fp32)."""
    if not texts:
        raise ValueError("encode_texts: no texts")
    lengths = lengths if lengths is not None else [len(t) for t in texts]
    out: np.ndarray | None = None
    with autocast(device, precision):
        for idx in length_batches(lengths, batch_size):
            emb = encode_fn([texts[i] for i in idx], len(idx)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
    assert out is not None
    return out


def load_dual_encoder(path: str, device: str | None = None, **overrides: Any) -> TextEncoder:
    """``DualEncoder.from_pretrained(path, **overrides)`` in eval mode on ``device``.

    A plain HF encoder folder works too (e.g. ``pooling="mean"`` for MiniLM).
    """
    from qgscale.models.encoder import DualEncoder

    return DualEncoder.from_pretrained(path, **overrides).to(device or default_device()).eval()


# ---------------------------------------------------------------- one shard
def encode_table(encoder: TextEncoder, table: pa.Table, batch_size: int, dtype: str = "float32",
                 device: str = "cpu", precision: str = "fp32", source: str = "") -> pa.Table:
    """CORPUS rows -> embedding rows ``{pid, lang, vector}`` (same order)."""
    missing = [c for c in CORPUS.names if c not in table.column_names]
    if missing:
        raise ValueError(f"{source}: corpus shard lacks field(s) {missing}")
    pids = table.column("pid").to_pylist()
    for i, pid in enumerate(pids):
        if not pid:
            raise ValueError(f"{source}: row {i}: field 'pid' is empty")
    texts = [passage_text(t, x) for t, x in zip(table.column("title").to_pylist(),
                                                 table.column("text").to_pylist(), strict=True)]
    lengths = token_lengths(getattr(encoder, "tokenizer", None), texts)
    vecs = encode_texts(encoder.encode_passages, texts, batch_size, lengths, device, precision)
    with np.errstate(over="ignore"):  # an overflow is reported below, row and pid
        vecs = vecs.astype(np.float16 if dtype == "float16" else np.float32, copy=False)
    bad = nonfinite_rows(vecs)
    if bad.size:  # never indexed: FAISS would drop it from every result list
        i = int(bad[0])
        raise DataError(f"{source}: row {i} (pid={pids[i]}): non-finite embedding ({bad.size} "
                        f"of {len(pids)} rows; index.encode.precision={precision}, "
                        f"dtype={dtype})")
    return embeddings_table(pids, vecs, dtype, table.column("lang"))


def nonfinite_rows(vecs: np.ndarray) -> np.ndarray:
    """The rows of ``vecs`` holding a NaN or an infinity (an overflow in fp16 autocast or
    storage, or a diverged model)."""
    return np.flatnonzero(~np.isfinite(vecs).all(axis=1))


def embeddings_table(pids: list[str], vecs: np.ndarray, dtype: str = "float32",
                     langs: Any = None) -> pa.Table:
    """Embedding rows ``{pid, lang, vector}`` (``{pid, vector}`` without ``langs``)."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = pa.array(vecs.astype(np_dtype, copy=False).reshape(-1))
    vec = pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])
    cols = [pa.array(pids, pa.string())]
    if langs is not None:
        cols.append(pc.cast(langs, pa.string()))
    return pa.Table.from_arrays(cols + [vec], schema=embeddings_schema(
        vecs.shape[1], dtype, lang=langs is not None))


def _on_device(loader: Callable[[], TextEncoder], device: str, threads: int) -> TextEncoder:
    """``loader()``'s encoder on ``device``: a loader builds on the CPU (a CPU actor on a GPU
    node sees the node's GPUs, which belong to other actors)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    encoder = loader()
    return encoder.to(device) if isinstance(encoder, torch.nn.Module) else encoder


@dataclass
class EncodeJob:
    """The shard job of :func:`encode_corpus`: load the encoder once per actor; per shard read
    the corpus file of its payload and encode it."""

    loader: Callable[[], TextEncoder]
    batch_size: int
    dtype: str
    precision: str

    def setup(self, device: str, threads: int) -> tuple[TextEncoder, str]:
        return _on_device(self.loader, device, threads), device

    def run(self, state: tuple[TextEncoder, str], shard: Shard) -> tuple[pa.Table, dict]:
        encoder, device = state
        corpus_uri: str = shard.payload
        table = storage.read_parquet(corpus_uri)
        emb = encode_table(encoder, table, self.batch_size, self.dtype, device,
                           self.precision, source=corpus_uri)
        return emb, {"source": corpus_uri}


class QueryEncoder:
    """Ray actor body holding one encoder for query batches (mining)."""

    def __init__(self, loader: Callable[[], TextEncoder], batch_size: int, precision: str,
                 num_gpus: float, threads: int):
        self.device = actor_device(num_gpus)
        self.encoder = _on_device(loader, self.device, threads)
        self.batch_size, self.precision = batch_size, precision

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``; a non-finite one is a DataError naming the query."""
        lengths = token_lengths(getattr(self.encoder, "tokenizer", None), texts)
        vecs = encode_texts(self.encoder.encode_queries, texts, self.batch_size, lengths,
                            self.device, self.precision)
        bad = nonfinite_rows(vecs)
        if bad.size:
            raise DataError(f"query {texts[int(bad[0])]!r}: non-finite embedding ({bad.size} "
                            f"of {len(texts)} queries; precision={self.precision})")
        return vecs


def encode_corpus(corpus_uri: str, out_uri: str, loader: Callable[[], TextEncoder],
                  ec: EncodeConfig | None = None, config_hash: str = "") -> dict:
    """Encode every ``*.parquet`` shard of ``corpus_uri`` into ``out_uri`` (resumable;
    settings ``ec``, the ``index.encode`` section; defaults if None).

    ``loader`` builds the encoder on the CPU inside each actor (e.g. ``functools.partial(
    load_dual_encoder, path, "cpu")``), which moves it to its device. Returns the manifest of
    the embedding shards.
    """
    ec = ec or EncodeConfig()
    shards = storage.list_files(corpus_uri, ".parquet")
    if not shards:
        raise FileNotFoundError(f"{corpus_uri}: no corpus parquet shards")
    units = [Shard(posixpath.basename(s)[: -len(".parquet")], 1, s) for s in shards]
    stats = run_shards(EncodeJob(loader, ec.batch_size, ec.dtype, ec.precision), units,
                       out_uri, config_hash, ec, stage="index.encode", desc="encode")
    return storage.ShardWriter(out_uri, config_hash).finalize(
        [u.name for u in units], corpus=corpus_uri, dtype=ec.dtype, run=stats)


def run_encode(cfg: Any, model_uri: str, corpus_uri: str, out_uri: str, key: str) -> dict:
    """Stage function ``index encode``: ``corpus_uri`` shards -> embedding shards at
    ``out_uri`` with the dual encoder at ``model_uri`` (``cfg.index.encode``)."""
    return encode_corpus(corpus_uri, out_uri,
                         functools.partial(load_dual_encoder, model_uri, "cpu"),
                         cfg.index.encode, key)
