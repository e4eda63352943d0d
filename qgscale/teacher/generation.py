"""``qgscale teacher generate``: cross-lingual queries written by the QG for passages.

For each passage (the training positives from qrels, or the whole corpus) and each target
language, ``num_queries`` queries by beam search or nucleus sampling. Output shards
``{pid, lang, query, logprob}`` (``qgscale.data.schema.GENERATED``; ``logprob`` = the query's
teacher score, the mean token log-prob), written as a shard job
(:func:`qgscale.runtime.run_shards`) with done markers and resume as scoring. Empty
generations (an immediate ``</s>``) are left out and counted in the manifest
(``empty_queries_dropped``). Sampling is seeded per shard and language, so a retried shard is
identical.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from qgscale import storage
from qgscale.config import GenerateConfig
from qgscale.data.schema import GENERATED
from qgscale.errors import ConfigError, DataError
from qgscale.runtime import Shard, connect, run_shards
from qgscale.teacher.common import QGSpec, load_corpus, qg_spec, read_table


@dataclass
class GenerateJob:
    """The shard job: load QG + corpus once per actor; per shard (a slice of the passage ids)
    generate in every language."""

    qg: QGSpec
    corpus_uri: str
    langs: list[str]
    options: dict[str, Any] = field(default_factory=dict)  # QueryGenerator.generate kwargs
    seed: int = 0

    def setup(self, device: str, threads: int) -> dict[str, Any]:
        return {"qg": self.qg.load(device, threads, self.options.get("precision", "bf16")),
                "corpus": load_corpus(self.corpus_uri)}

    def run(self, st: dict[str, Any], shard: Shard) -> tuple[pa.Table, dict]:
        pids: list[str] = shard.payload
        passages = [st["corpus"][p] for p in pids]
        rows: dict[str, list] = {"pid": [], "lang": [], "query": [], "logprob": []}
        empty = 0
        for lang in self.langs:
            seed = self.seed + zlib.crc32(f"{shard.name}\t{lang}".encode())
            out = st["qg"].generate(passages, lang, seed=seed, **self.options)
            for pid, queries in zip(pids, out, strict=True):
                for query, logprob in queries:
                    if not query:  # no query to train on: counted in the manifest
                        empty += 1
                        continue
                    rows["pid"].append(pid)
                    rows["lang"].append(lang)
                    rows["query"].append(query)
                    rows["logprob"].append(logprob)
        return pa.table(rows, schema=GENERATED), {"empty_queries": empty}


def passage_ids(corpus_uri: str, qrels_uri: str | None) -> list[str]:
    """Corpus pids in corpus order; with ``qrels_uri`` only the positives (rel > 0)."""
    pids = read_table(corpus_uri, "corpus", ["pid"])["pid"].to_pylist()
    if qrels_uri is None:
        return list(dict.fromkeys(pids))
    qrels = read_table(qrels_uri, "qrels", ["qid", "pid", "rel"]).to_pylist()
    known = set(pids)
    positive = set()
    for i, r in enumerate(qrels):
        if (r["rel"] or 0) > 0:
            if r["pid"] not in known:
                raise DataError(f"{qrels_uri}: row {i} (qid={r['qid']}): pid={r['pid']} not in "
                                f"corpus {corpus_uri}")
            positive.add(r["pid"])
    return [p for p in dict.fromkeys(pids) if p in positive]


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
    pids = passage_ids(corpus_uri, qrels_uri)
    units = [Shard(name, (rows.stop - rows.start) * len(langs), pids[rows])
             for name, rows in storage.shard_slices(len(pids), gc.shard_rows) if pids]
    job = GenerateJob(qg, corpus_uri, list(langs), options, seed)
    stats = run_shards(job, units, out_uri, config_hash, gc, stage="teacher.generate",
                       desc="teacher generate", unit="passage-lang")
    empty = sum(storage.read_json(storage.join(out_uri, storage.DONE_DIR, f"{u.name}.json"))
                .get("empty_queries", 0) for u in units)
    return storage.ShardWriter(out_uri, config_hash).finalize(
        [u.name for u in units], stage="teacher-generate", inputs=inputs, passages=len(pids),
        langs=list(langs), empty_queries_dropped=empty, run=stats)


def run_generate(cfg: Any, model: Any, corpus_uri: str, qrels_uri: str | None, out_uri: str,
                 key: str) -> dict[str, Any]:
    """Stage function ``teacher generate`` (``cfg.teacher.generate``): queries in every
    language of ``langs`` for the passages of ``corpus_uri`` (the positives of ``qrels_uri``
    when given) with the QG ``model`` (a ``ModelConfig``), into ``out_uri``."""
    gc = cfg.teacher.generate
    connect(cfg.ray)
    return generate_queries(qg_spec(cfg, model), corpus_uri, out_uri, key, gc, qrels_uri,
                            seed=cfg.run.seed)
