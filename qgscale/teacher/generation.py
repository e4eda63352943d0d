"""``qgscale teacher generate``: cross-lingual queries written by the QG for passages.

For each passage (the training positives from qrels, or the whole corpus) and each target
language, ``num_queries`` queries by beam search or nucleus sampling. Output shards
``{pid, lang, query, logprob}`` (``qgscale.data.schema.GENERATED``; ``logprob`` = the query's
teacher score, the mean token log-prob), written as a shard job
(:func:`qgscale.runtime.run_shards`) with done markers and resume as scoring. Empty
generations (an immediate ``</s>``) and repeats of a query already kept for the same passage
and language are left out and counted in the manifest (``empty_queries_dropped``,
``repeated_queries_dropped``). Sampling is seeded per shard and language, so a retried shard is
identical. A work unit names a row range of one shard, read as its row groups
(:func:`qgscale.storage.read_rows`): a shard of the positives' texts, which the driver streams
out of the corpus (the semi-join of :mod:`qgscale.data.corpus`) into ``_passages/``, or of a
corpus shard (``passages: corpus``): no process holds the corpus or every positive's text,
and no actor reads a whole corpus shard for one unit. Units hold ``shard_rows`` passages, or
fewer so that every actor of the pool gets work (:func:`qgscale.runtime.unit_rows`); a resumed
run keeps the first run's unit size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgscale import storage
from qgscale.config import GenerateConfig
from qgscale.data.corpus import check, corpus_shards, iter_passages
from qgscale.data.schema import GENERATED, passage_text
from qgscale.errors import DataError
from qgscale.runtime import Shard, connect, planned_unit_rows, run_shards, unit_rows
from qgscale.teacher.common import QGSpec, qg_spec, read_table


@dataclass
class Passages:
    """A work unit's passages: rows ``[start, stop)`` of one parquet shard, read as its row
    groups (:func:`qgscale.storage.read_rows`): a corpus shard (``passages: corpus``), or a
    shard of the positives' texts that the driver streamed to ``_passages/`` (columns
    ``pid, passage``)."""

    uri: str
    start: int = 0
    stop: int = 0
    corpus: bool = True  # a corpus shard (pid, title, text), else a positives' shard

    def read(self) -> tuple[list[str], list[str]]:
        if not self.corpus:
            t = storage.read_rows(self.uri, self.start, self.stop, ["pid", "passage"])
            return t.column("pid").to_pylist(), t.column("passage").to_pylist()
        t = storage.read_rows(self.uri, self.start, self.stop, ["pid", "title", "text"])
        check(t, self.uri, self.start)
        return t.column("pid").to_pylist(), [
            passage_text(a, b) for a, b in zip(t.column("title").to_pylist(),
                                               t.column("text").to_pylist(), strict=True)]


PASSAGES_DIR = "_passages"  # under the generated folder: the positives' texts, for the units
POSITIVES = pa.schema([("pid", pa.string()), ("passage", pa.string())])


@dataclass
class GenerateJob:
    """The shard job: load the QG once per actor; per shard (its :class:`Passages`)
    generate in every language."""

    qg: QGSpec
    langs: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # QueryGenerator.generate kwargs
    seed: int = 0

    def setup(self, device: str, threads: int) -> Any:
        return self.qg.load(device, threads, self.options.get("precision", "bf16"),
                            "teacher.generate.precision")

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
               num_actors: int = 1, rows_of: Callable[[int], int] | None = None,
               work_uri: str = "", config_hash: str = "") -> tuple[list[Shard], int, int]:
    """Work units, the passage count and the passages per unit (``rows_of(n)`` of the ``n``
    passages, else :func:`qgscale.runtime.unit_rows` of ``shard_rows`` and ``num_actors``).
    With ``qrels_uri``: the positives (rel > 0), in corpus order, their texts streamed by the
    semi-join into shards of one unit each under ``work_uri`` (kept with ``config_hash``, so a
    resume reads them again); without: row ranges of every corpus shard (parquet footers
    only). The driver holds the positives' pids and one shard of texts, never the corpus."""
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
                            Passages(uri, r.start, r.stop))
                      for k, (_, r) in enumerate(storage.shard_slices(n, rows)) if n]
        return units, n_all, rows
    if not work_uri:
        raise ValueError("plan_units: the positives' texts need a work_uri")
    qrels = read_table(qrels_uri, "qrels", ["qid", "pid", "rel"])
    positive = qrels.filter(pc.fill_null(pc.greater(qrels.column("rel"), 0), False))
    pids = pc.unique(positive.column("pid"))
    rows = (rows_of or rows_default)(len(pids))
    m = storage.read_manifest(work_uri)
    if not (m and m.get("config_hash") == config_hash and m.get("unit_rows") == rows):
        storage.remove(work_uri, recursive=True)  # another plan: written again
        m = storage.ShardWriter(work_uri, config_hash).write_rows(
            _once(iter_passages(corpus_uri, pids), corpus_uri), rows, POSITIVES,
            unit_rows=rows)
    if m["rows"] != len(pids):  # a positive passage not in the corpus
        got = storage.read_parquet(work_uri, ["pid"]).column("pid")
        missing = pc.and_(pc.fill_null(pc.greater(qrels.column("rel"), 0), False),
                          pc.invert(pc.is_in(qrels.column("pid"), value_set=got)))
        i = pc.index(missing, True).as_py()
        raise DataError(f"{qrels_uri}: row {i} (qid={qrels['qid'][i]}): pid="
                        f"{qrels['pid'][i]} not in corpus {corpus_uri}")
    return [Shard(sh["name"], sh["rows"] * n_langs,
                  Passages(storage.join(work_uri, sh["file"]), 0, sh["rows"], corpus=False))
            for sh in m["shards"] if sh["rows"]], m["rows"], rows


def _once(passages: Iterator[tuple[str, str]], corpus_uri: str) -> Iterator[dict[str, str]]:
    """The ``{pid, passage}`` rows of ``passages``; a pid on two corpus rows is a DataError
    (its queries would be generated twice)."""
    seen: set[str] = set()
    for pid, text in passages:
        if pid in seen:
            raise DataError(f"{corpus_uri}: pid={pid} is on two corpus rows: a pid names one "
                            "passage")
        seen.add(pid)
        yield {"pid": pid, "passage": text}


def generate_queries(qg: QGSpec, corpus_uri: str, out_uri: str, config_hash: str,
                     gc: GenerateConfig | None = None, qrels_uri: str | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Plain API: generate for the passages of ``corpus_uri`` (positives of ``qrels_uri``
    when given) into ``out_uri`` (settings ``gc``, the ``teacher.generate`` section; defaults
    if None); returns the manifest. Shards finished with the same ``config_hash`` are skipped
    (resume), like :mod:`scoring`."""
    gc = gc or GenerateConfig()
    langs = gc.langs
    options = gc.model_dump(include={"num_queries", "do_sample", "num_beams", "top_p",
                                     "max_new_tokens", "batch_size", "precision"})
    inputs = {"corpus": corpus_uri, "qrels": qrels_uri}
    units, n_passages, rows = plan_units(  # units sized to the actor pool, kept on resume
        corpus_uri, qrels_uri, gc.shard_rows, len(langs), rows_of=lambda n: planned_unit_rows(
            out_uri, config_hash, n, gc.shard_rows, gc, "teacher.generate"),
        work_uri=storage.join(out_uri, PASSAGES_DIR), config_hash=config_hash)
    job = GenerateJob(qg, list(langs), options, seed)
    stats = run_shards(job, units, out_uri, config_hash, gc, stage="teacher.generate",
                       desc="teacher generate", unit="passage-lang")
    writer = storage.ShardWriter(out_uri, config_hash)
    done = writer.markers()
    marks = [done.get(u.name, {}) for u in units]  # finalize names a missing one
    return writer.finalize(
        [u.name for u in units], done, stage="teacher-generate", inputs=inputs,
        passages=n_passages,
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
