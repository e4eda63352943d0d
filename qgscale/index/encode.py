"""Corpus encoding: Ray actors turn CORPUS shards into embedding shards ``{pid, vector}``.

The fast path is plain torch (:func:`encode_texts`: length bucketing + autocast) so a GPU box
without Ray can run it; :class:`EncodeActor` wraps it and :func:`encode_corpus` fans shards
out over an actor pool. Every embedding shard is written atomically with a done marker
(:class:`qgscale.storage.ShardWriter`); a re-run skips finished shards.
"""

from __future__ import annotations

import contextlib
import functools
import posixpath
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from qgscale import storage
from qgscale.data.schema import (
    CORPUS,
    embeddings_schema,
    passage_text,  # noqa: F401  (re-exported)
)
from qgscale.raycluster import apply_worker_env as apply_storage_env  # noqa: F401
from qgscale.raycluster import connect
from qgscale.raycluster import worker_env as storage_env  # noqa: F401


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


def autocast_context(device: torch.device | str, precision: str = "fp32"):
    """``torch.autocast`` on CUDA for bf16/fp16; a no-op on CPU or for fp32."""
    device = torch.device(device)
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


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
    with autocast_context(device, precision):
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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- one shard
def encode_table(encoder: TextEncoder, table: pa.Table, batch_size: int, dtype: str = "float32",
                 device: str = "cpu", precision: str = "fp32", source: str = "") -> pa.Table:
    """CORPUS rows -> embedding rows ``{pid, vector}`` (same order)."""
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
    return embeddings_table(pids, vecs, dtype)


def embeddings_table(pids: list[str], vecs: np.ndarray, dtype: str = "float32") -> pa.Table:
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = pa.array(vecs.astype(np_dtype, copy=False).reshape(-1))
    vec = pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1])
    return pa.Table.from_arrays([pa.array(pids, pa.string()), vec],
                                schema=embeddings_schema(vecs.shape[1], dtype))


def read_vectors(uri: str) -> tuple[list[str], np.ndarray]:
    """An embedding shard as ``(pids, float32 matrix)``."""
    table = storage.read_parquet(uri)
    col = table.column("vector").combine_chunks()
    dim = col.type.list_size
    vecs = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return table.column("pid").to_pylist(), np.ascontiguousarray(vecs)


class EncodeActor:
    """Holds one encoder; encodes whole corpus shards into embedding shards."""

    def __init__(self, loader: Callable[[], TextEncoder], env: dict[str, str],
                 batch_size: int, dtype: str, precision: str):
        apply_storage_env(env)
        self.device = default_device()
        self.encoder = loader()
        self.batch_size, self.dtype, self.precision = batch_size, dtype, precision

    def encode_shard(self, corpus_uri: str, out_root: str, name: str, chash: str) -> int:
        writer = storage.ShardWriter(out_root, chash)
        if writer.done(name):
            return 0
        table = storage.read_parquet(corpus_uri)
        emb = encode_table(self.encoder, table, self.batch_size, self.dtype, self.device,
                           self.precision, source=corpus_uri)
        writer.write(name, emb, source=corpus_uri)
        return table.num_rows

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        lengths = token_lengths(getattr(self.encoder, "tokenizer", None), texts)
        return encode_texts(self.encoder.encode_queries, texts, self.batch_size, lengths,
                            self.device, self.precision)


def actor_resources(num_actors: int | None, cpus_per_actor: float) -> tuple[int, dict]:
    """One actor per GPU when the cluster has GPUs, else one per spare CPU (driver keeps one)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return num_actors or gpus, {"num_gpus": 1, "num_cpus": cpus_per_actor}
    spare = max(1, int(res.get("CPU", 1) - 1))
    return num_actors or max(1, int(spare // max(cpus_per_actor, 1e-6))), {
        "num_cpus": cpus_per_actor}


def encode_corpus(corpus_uri: str, out_uri: str, loader: Callable[[], TextEncoder], *,
                  batch_size: int = 64, dtype: str = "float32", precision: str = "fp32",
                  num_actors: int | None = None, cpus_per_actor: float = 1.0,
                  config_hash: str = "", max_retries: int = 2) -> dict:
    """Encode every ``*.parquet`` shard of ``corpus_uri`` into ``out_uri`` (resumable).

    ``loader`` builds the encoder inside each actor (e.g. ``functools.partial(
    load_dual_encoder, path)``). Returns the manifest of the embedding shards.
    """
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    connect()
    shards = storage.list_files(corpus_uri, ".parquet")
    if not shards:
        raise FileNotFoundError(f"{corpus_uri}: no corpus parquet shards")
    names = [posixpath.basename(s)[: -len(".parquet")] for s in shards]
    writer = storage.ShardWriter(out_uri, config_hash)
    todo = [(s, n) for s, n in zip(shards, names, strict=True) if not writer.done(n)]
    if todo:
        n_actors, res = actor_resources(num_actors, cpus_per_actor)
        n_actors = min(n_actors, len(todo))
        cls = ray.remote(max_restarts=max_retries, max_task_retries=max_retries, **res)(
            EncodeActor)
        actors = [cls.remote(loader, storage_env(), batch_size, dtype, precision)
                  for _ in range(n_actors)]
        pool = ActorPool(actors)
        start, total = time.time(), 0
        bar = tqdm(total=len(todo), unit="shard", desc="encode")
        for rows in pool.map_unordered(
                lambda a, t: a.encode_shard.remote(t[0], out_uri, t[1], config_hash), todo):
            total += rows
            bar.set_postfix(passages_per_s=f"{total / max(time.time() - start, 1e-9):.1f}")
            bar.update(1)
        bar.close()
        for a in actors:
            ray.kill(a)
    return writer.finalize(names, corpus=corpus_uri, dtype=dtype)


def run_encode(cfg: Any, model_uri: str, corpus_uri: str, out_uri: str, key: str) -> dict:
    """Stage function ``index encode``: ``corpus_uri`` shards -> embedding shards at
    ``out_uri`` with the dual encoder at ``model_uri`` (``cfg.index`` settings)."""
    ic = cfg.index
    loader = functools.partial(load_dual_encoder, model_uri)
    return encode_corpus(corpus_uri, out_uri, loader, batch_size=ic.batch_size, dtype=ic.dtype,
                         precision=ic.precision, num_actors=ic.num_actors,
                         cpus_per_actor=ic.cpus_per_actor, config_hash=key)
