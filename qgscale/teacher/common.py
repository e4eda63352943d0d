"""Shared pieces of the teacher stages: the QG to load, text lookups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from qgscale import storage
from qgscale.data.keyindex import KeyIndex
from qgscale.errors import ConfigError, DataError, MissingInputError


@dataclass
class QGSpec:
    """How an actor builds the query generator (picklable; loaded once per actor)."""

    model: dict[str, Any]  # ModelConfig fields
    prompt: str
    max_passage_len: int = 256
    max_query_len: int = 64
    seed: int = 0

    def load(self, device: str, threads: int = 1, precision: str = "bf16",
             setting: str = "precision"):
        """The QG on ``device`` (the actor's, :func:`qgscale.runtime.actor_device`), its
        weights cast to ``precision`` (the config's ``setting``) on GPU
        (benchmarks/gpu_check.py); on CPU fp32 with ``threads`` torch threads."""
        import torch

        from qgscale.config import ModelConfig
        from qgscale.models.generator import QueryGenerator, prepare_for_inference, saved_meta
        from qgscale.models.loading import resolve

        if self.model.get("name_or_path"):  # its scores are log P(q | its prompt(p))
            trained = saved_meta(resolve(self.model["name_or_path"])).get("prompt")
            if trained and trained != self.prompt:
                raise ConfigError(f"{self.model['name_or_path']}: this query generator was "
                                  f"trained with prompt {trained!r}, the config gives qg.prompt "
                                  f"{self.prompt!r}: set qg.prompt to the trained one")
        if device == "cpu":
            torch.set_num_threads(threads)
        qg = QueryGenerator.build(ModelConfig(**self.model), self.prompt, self.max_passage_len,
                                  self.max_query_len, seed=self.seed)
        prepare_for_inference(qg.model, device, precision, setting)
        return qg.eval()


def qg_spec(cfg: Any, model: Any) -> QGSpec:
    """How actors load the QG ``model`` (a ``ModelConfig``, or a path) with the run's prompt,
    lengths and seed."""
    from qgscale.config import ModelConfig

    if isinstance(model, str):
        model = ModelConfig(name_or_path=model)
    path = model.name_or_path
    if path and "://" not in path and not path.startswith("pkg:") and path.startswith("/") \
            and not storage.exists(storage.join(path, "config.json")):
        raise MissingInputError(f"{path}: no query generator here; run `qgscale train qg` "
                                "first or set teacher.model")
    return QGSpec(model.model_dump(), cfg.qg.prompt, cfg.qg.max_passage_len,
                  cfg.qg.max_query_len, cfg.run.seed)


def read_table(uri: str, what: str, columns: list[str] | None = None):
    if not storage.exists(uri):
        raise MissingInputError(f"{uri}: {what} not found")
    return storage.read_parquet(uri, columns)


def load_queries(uris: str | list[str]) -> dict[str, tuple[str, str]]:
    """``qid -> (lang, text)`` of one or several query tables (each a file or a folder of
    shards). An empty field, or a qid in two rows (of one table or two), is a DataError naming
    the file and its row (both rows for a duplicate)."""
    out: dict[str, tuple[str, str]] = {}
    files: list[str] = []
    for uri in [uris] if isinstance(uris, str) else uris:
        if not storage.exists(uri):
            raise MissingInputError(f"{uri}: queries not found")
        files += storage.parquet_files(uri)
    for n, f in enumerate(files):
        for i, r in enumerate(storage.read_parquet(f, ["qid", "lang", "text"]).to_pylist()):
            where = f"{f}: row {i} (qid={r['qid']})"
            for key in ("qid", "lang", "text"):
                if not r[key] or not str(r[key]).strip():
                    raise DataError(f"{where}: empty field {key!r}")
            if r["qid"] in out:  # found again: where it was first (no location kept per qid)
                first = _first_row(files[:n + 1], r["qid"])
                raise DataError(f"{where}: qid also in {first} (one row per qid)")
            out[r["qid"]] = (r["lang"], r["text"])
    return out


def _first_row(files: list[str], qid: str) -> str:
    """``"<file> row <i>"`` of the first row of ``qid`` in ``files``."""
    for f in files:
        qids = storage.read_parquet(f, ["qid"]).column("qid").to_pylist()
        if qid in qids:
            return f"{f} row {qids.index(qid)}"
    raise AssertionError(qid)


def generated_of(generated_uri: str, pids: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(pid, lang, query)`` of the generated queries of the passages ``pids``, in table
    order. File by file: each file's pid column is read first, its other columns only when a
    pid matches (then the file's, one file at a time), and only the matching rows are kept:
    memory is one file plus those rows, not the table (which, with
    ``teacher.generate.passages: corpus``, has rows for every corpus passage and language).
    An empty lang or query among those rows is a DataError naming the file and row (other
    rows are not read for it)."""
    if not storage.exists(generated_uri):
        raise MissingInputError(f"{generated_uri}: generated queries not found")
    wanted = KeyIndex.of(pids)
    out: list[tuple[str, str, str]] = []
    for f in storage.parquet_files(generated_uri):
        rows = np.flatnonzero(wanted.contains(storage.read_parquet(f, ["pid"]).column("pid")))
        if not rows.size:
            continue
        t = storage.read_parquet(f, ["pid", "lang", "query"]).take(pa.array(rows))
        for i, r in zip(rows.tolist(), t.to_pylist(), strict=True):
            for key in ("lang", "query"):
                if not r[key] or not r[key].strip():
                    raise DataError(f"{f}: row {i} (pid={r['pid']}): empty field {key!r}")
            out.append((r["pid"], r["lang"], r["query"]))
    return out
