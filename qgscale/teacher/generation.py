"""``qgscale teacher generate``: cross-lingual queries written by the QG for passages.

For each passage (the training positives from qrels, or the whole corpus) and each target
language, ``num_queries`` queries by beam search or nucleus sampling. Output shards
``{pid, lang, query, logprob}`` (``qgscale.data.schema.GENERATED``; ``logprob`` = the query's
teacher score, the mean token log-prob), written as a shard job
(:func:`qgscale.runtime.run_shards`) with done markers and resume as scoring. Empty
generations (an immediate ``</s>``) and repeats of a query already kept for the same passage
and language are left out and counted in the manifest (``empty_queries_dropped``,
``repeated_queries_dropped``). Sampling is seeded per shard and language, so a retried shard is
identical. Work units carry their passages (the positives' texts, read by the semi-join of
:mod:`qgscale.data.corpus`), or name a row range of one corpus shard (``passages: corpus``,
read as its row groups: :func:`qgscale.storage.read_rows`): no actor loads the corpus, nor a
whole shard. Units hold ``shard_rows`` passages, or fewer so that every actor of the pool gets
work (:func:`qgscale.runtime.unit_rows`); a resumed run keeps the first run's unit size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qgscale import storage
from qgscale.config import GenerateConfig
from qgscale.data.corpus import check, corpus_shards, read_passages
from qgscale.data.schema import GENERATED, passage_text
from qgscale.errors import ConfigError, DataError
from qgscale.runtime import Shard, connect, planned_unit_rows, run_shards, unit_rows
from qgscale.teacher.common import QGSpec, qg_spec, read_table


@dataclass
class Passages:
    """A work unit's passages, sent with the unit: inline ``(pid, text)`` pairs (the
    positives), or rows ``[start, stop)`` of one corpus shard (``passages: corpus``)."""

    pairs: list[tuple[str, str]] | None = None
    uri: str = ""
    start: int = 0
    stop: int = 0

    def read(self) -> tuple[list[str], list[str]]:
        if self.pairs is not None:
            return [p for p, _ in self.pairs], [t for _, t in self.pairs]
        t = storage.read_rows(self.uri, self.start, self.stop, ["pid", "title", "text"])
        check(t, self.uri, self.start)
        return t.column("pid").to_pylist(), [
            passage_text(a, b) for a, b in zip(t.column("title").to_pylist(),
                                               t.column("text").to_pylist(), strict=True)]


@dataclass
class GenerateJob:
    """The shard job: load the QG once per actor; per shard (its :class:`Passages`)
    generate in every language."""

    qg: QGSpec
    langs: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # QueryGenerator.generate kwargs
    seed: int = 0

    def setup(self, device: str, threads: int) -> Any:
        return self.qg.load(device, threads, self.options.get("precision", "bf16"))

    def run(self, qg: Any, shard: Shard) -> tuple[pa.Table, dict]:
        pids, passages = shard.payload.read()
        rows: dict[str, list] = {"pid": [], "lang": [], "query": [], "logprob": []}
        empty = repeated = 0
        for lang in self.langs:
            seed = self.seed + zlib.crc32(f"{shard.name}\t{lang}".encode())
            out = qg.generate(passages, lang, seed=seed, **self.options)
            for pid, queries in zip(pids, out, strict=True):
                seen = set()
                for query, logprob in queries:
                    # no query to train on, or one already kept (sampling, or beams that
                    # differ only in special tokens or spaces): counted in the manifest; a
                    # repeat would be drawn more often as the row's generated query
                    if not query or query in seen:
                        empty += not query
                        repeated += bool(query)
                        continue
                    seen.add(query)
                    rows["pid"].append(pid)
                    rows["lang"].append(lang)
                    rows["query"].append(query)
                    rows["logprob"].append(logprob)
        return pa.table(rows, schema=GENERATED), {"empty_queries": empty,
                                                  "repeated_queries": repeated}


def plan_units(corpus_uri: str, qrels_uri: str | None, shard_rows: int, n_langs: int,
               num_actors: int = 1, rows_of: Callable[[int], int] | None = None
               ) -> tuple[list[Shard], int, int]:
    """Work units, the passage count and the passages per unit (``rows_of(n)`` of the ``n``
    passages, else :func:`qgscale.runtime.unit_rows` of ``shard_rows`` and ``num_actors``).
    With ``qrels_uri``: the positives (rel > 0), in corpus order, their text read by the
    semi-join and sent inline; without: row ranges of every corpus shard (parquet footers
    only), read by the actor. The driver never holds the corpus."""
    def rows_default(n: int) -> int:
        return unit_rows(n, shard_rows, num_actors)

    if qrels_uri is None:
        counts = []
        for uri in corpus_shards(corpus_uri):
            fs, path = storage.url_to_fs(uri)
            with fs.open(path, "rb") as f:
                counts.append((uri, pq.ParquetFile(f).metadata.num_rows))
        n_all = sum(n for _, n in counts)
        rows = (rows_of or rows_default)(n_all)
        units = []
        for fi, (uri, n) in enumerate(counts):
            units += [Shard(f"part-{fi:05d}-{k:04d}", (r.stop - r.start) * n_langs,
                            Passages(uri=uri, start=r.start, stop=r.stop))
                      for k, (_, r) in enumerate(storage.shard_slices(n, rows)) if n]
        return units, n_all, rows
    qrels = read_table(qrels_uri, "qrels", ["qid", "pid", "rel"]).to_pylist()
    positive = {r["pid"]: i for i, r in enumerate(qrels) if (r["rel"] or 0) > 0}
    texts = read_passages(corpus_uri, positive)
    for pid, i in positive.items():
        if pid not in texts:
            raise DataError(f"{qrels_uri}: row {i} (qid={qrels[i]['qid']}): pid={pid} not in "
                            f"corpus {corpus_uri}")
    pairs = list(texts.items())
    rows = (rows_of or rows_default)(len(pairs))
    return [Shard(name, (r.stop - r.start) * n_langs, Passages(pairs=pairs[r]))
            for name, r in storage.shard_slices(len(pairs), rows) if pairs], len(pairs), rows


def generate_queries(qg: QGSpec, corpus_uri: str, out_uri: str, config_hash: str,
                     gc: GenerateConfig | None = None, qrels_uri: str | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Plain API: generate for the passages of ``corpus_uri`` (positives of ``qrels_uri``
    when given) into ``out_uri`` (settings ``gc``, the ``teacher.generate`` section; defaults
    if None); returns the manifest. Shards finished with the same ``config_hash`` are skipped
    (resume), like :mod:`scoring`."""
    gc = gc or GenerateConfig()
    langs = gc.langs
    if not langs:
        raise ConfigError("teacher.generate.langs is empty")
    if not gc.do_sample and gc.num_beams < gc.num_queries:
        raise ConfigError(f"teacher.generate: num_queries={gc.num_queries} needs num_beams >= "
                          f"num_queries (num_beams={gc.num_beams}) or do_sample=true")
    options = gc.model_dump(include={"num_queries", "do_sample", "num_beams", "top_p",
                                     "max_new_tokens", "batch_size", "precision"})
    inputs = {"corpus": corpus_uri, "qrels": qrels_uri}
    units, n_passages, rows = plan_units(  # units sized to the actor pool, kept on resume
        corpus_uri, qrels_uri, gc.shard_rows, len(langs), rows_of=lambda n: planned_unit_rows(
            out_uri, config_hash, n, gc.shard_rows, gc, "teacher.generate"))
    job = GenerateJob(qg, list(langs), options, seed)
    stats = run_shards(job, units, out_uri, config_hash, gc, stage="teacher.generate",
                       desc="teacher generate", unit="passage-lang")
    writer = storage.ShardWriter(out_uri, config_hash)
    done = writer.markers()
    marks = [done.get(u.name, {}) for u in units]  # finalize names a missing one
    return writer.finalize(
        [u.name for u in units], stage="teacher-generate", inputs=inputs, passages=n_passages,
        langs=list(langs), empty_queries_dropped=sum(m.get("empty_queries", 0) for m in marks),
        repeated_queries_dropped=sum(m.get("repeated_queries", 0) for m in marks),
        unit_rows=rows, run=stats)


def run_generate(cfg: Any, model: Any, corpus_uri: str, qrels_uri: str | None, out_uri: str,
                 key: str) -> dict[str, Any]:
    """Stage function ``teacher generate`` (``cfg.teacher.generate``): queries in every
    language of ``langs`` for the passages of ``corpus_uri`` (the positives of ``qrels_uri``
    when given) with the QG ``model`` (a ``ModelConfig``), into ``out_uri``."""
    gc = cfg.teacher.generate
    connect(cfg.ray)
    return generate_queries(qg_spec(cfg, model), corpus_uri, out_uri, key, gc, qrels_uri,
                            seed=cfg.run.seed)
