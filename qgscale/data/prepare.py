"""``qgscale data prepare``: raw dataset -> canonical parquet shards (+ JSONL import/export)."""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec

from qgscale import storage
from qgscale.data import readers
from qgscale.data.collection import write_collection
from qgscale.data.schema import SCHEMAS
from qgscale.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("xquad", "xor-tydi", "mkqa", "tatoeba", "beir", "dpr", "qas", "passages",
           "jsonl")
# the keyword arguments of :func:`read` that each format uses (it ignores the others)
READ_ARGS = {"xquad": ("query_langs", "corpus_langs", "test_mod"),
             "xor-tydi": ("passages", "query_langs", "corpus_langs"),
             "mkqa": ("query_langs", "answer_lang"), "tatoeba": ("query_langs",),
             "beir": ("lang",), "dpr": ("passages", "lang", "corpus_langs"),
             "qas": ("passages", "lang", "corpus_langs"), "passages": ("lang",),
             "jsonl": ("kind",)}


def _is_folder_or_zip(path: str) -> bool:
    if path.endswith(".zip"):
        return True
    fs, p = fsspec.core.url_to_fs(path)
    return fs.isdir(p)


def read(fmt: str, input: str, *, passages: str | None = None,
         query_langs: list[str] | None = None, corpus_langs: list[str] | None = None,
         test_mod: int = 4, kind: str | None = None, lang: str = "und",
         answer_lang: str | None = None, stream: bool = False,
         rejects: readers.Rejects | None = None, collection: bool = True
         ) -> readers.Tables:
    """Read raw ``input`` of format ``fmt`` into canonical tables (kind path -> rows).

    - ``xor-tydi``: XOR-TyDi / MIA queries + answers; ``passages``: the English collection.
    - ``mkqa``: the MKQA JSONL(.gz) file, or the MIA 2022 per-language files (a folder or
      ``.zip``); ``answer_lang``: take each example's answers in that language.
    - ``dpr``: DPR / Tevatron training data (queries, answers, qrels, examples, corpus of the
      inline passages); ``lang``: the questions' language where records have no ``lang``;
      ``corpus_langs=[x]``: the passages' language (default ``lang``; required with
      ``passages``); ``passages``: the collection the passages come from (psgs_w100) as the
      corpus instead, streamed, every passage the file names checked to be in it.
    - ``qas``: DPR's question-answer files (``nq-test.qas.csv``): queries + answers in
      language ``lang``; ``passages``: a collection (language ``corpus_langs=[x]``) as the
      corpus.
    - ``passages``: a passage collection alone (psgs_w100.tsv, pyserini / BEIR JSONL), in
      language ``lang``.

    With ``stream``, passage collections (``passages``, ``xor-tydi``'s and ``dpr``'s
    ``passages``, ``beir``'s ``corpus.jsonl``, ``jsonl`` of kind ``corpus``) are generators,
    read while they are written: the whole collection is never in memory. Their passage ids
    are checked for duplicates in memory (:func:`prepare` reads a collection in parallel
    instead, and checks its ids in bounded memory: :mod:`qgscale.data.collection`).

    ``collection=False`` leaves out the corpus that a passage collection is (formats
    ``passages``, ``xor-tydi``, ``qas``, ``beir``, ``jsonl`` of kind ``corpus``):
    :func:`prepare` reads it in parallel.
    (``dpr`` over a collection ignores it: :func:`prepare` reads that one in parallel with
    :class:`~qgscale.data.readers.NamedPassages`, not through this function.)
    """
    check_args(fmt, passages=passages, corpus_langs=corpus_langs, kind=kind, lang=lang)
    rejects = rejects or readers.Rejects()
    if fmt == "xquad":
        return readers.read_xquad(input, query_langs, corpus_langs, test_mod, rejects)
    if fmt == "xor-tydi":
        tables = readers.read_xor_queries(input, rejects, query_langs)
        if passages and collection:
            rows = readers.iter_passages(passages, "en", rejects)
            tables["corpus"] = rows if stream else list(rows)
        return tables
    if fmt == "passages":
        if not collection:
            return {}
        rows = readers.iter_passages(input, lang, rejects)
        return {"corpus": rows if stream else list(rows)}
    if fmt == "dpr":
        plang = corpus_langs[0] if corpus_langs else None
        if not passages:
            tables = readers.read_dpr(input, lang, rejects, passage_lang=plang)
            return tables if stream else {**tables, "corpus": list(tables["corpus"])}
        rows = readers.iter_passages(passages, plang, rejects)
        streams = readers.dpr_on_collection(input, passages, rows, lang, rejects)
        return streams if stream else {k: list(v) for k, v in streams.items()}  # corpus first
    if fmt == "qas":
        tables = readers.read_qas(input, lang, rejects)
        if passages and collection:
            rows = readers.iter_passages(passages, corpus_langs[0], rejects)
            tables["corpus"] = rows if stream else list(rows)
        return tables
    if fmt == "mkqa":
        if _is_folder_or_zip(input):
            return readers.read_mkqa_per_language(input, query_langs, answer_lang, rejects)
        return readers.read_mkqa(input, query_langs, rejects, answer_lang)
    if fmt == "tatoeba":
        return readers.read_tatoeba(input, query_langs, rejects)
    if fmt == "beir":
        return readers.read_beir(input, lang, rejects, stream=stream, corpus=collection)
    if fmt == "jsonl":
        if kind == "corpus" and not collection:
            return {}
        rows = readers.iter_canonical_jsonl(input, kind, rejects)
        return {kind: rows if stream else list(rows)}
    raise _unknown(fmt)


def check_args(fmt: str, *, passages: str | None = None,
               corpus_langs: list[str] | None = None, kind: str | None = None,
               lang: str | None = None) -> None:
    """The arguments of :func:`read` that no reader could use: a ConfigError before anything
    is read or cleared."""
    if fmt not in FORMATS:
        raise _unknown(fmt)
    if fmt == "xor-tydi" and corpus_langs and corpus_langs != ["en"]:
        raise ConfigError(f"data.corpus_langs={corpus_langs}: the XOR-Retrieve corpus is "
                          "English Wikipedia (psgs_w100): leave it out or give [en]")
    if fmt in ("dpr", "qas") and corpus_langs and len(corpus_langs) > 1:
        raise ConfigError(f"data.corpus_langs={corpus_langs}: a DPR file's passages carry no "
                          "language, so give one (the language of all its passages)")
    if fmt in ("dpr", "qas") and passages and not corpus_langs:
        raise ConfigError(f"data.passages={passages}: give the collection's language as "
                          "data.corpus_langs (--corpus-langs), e.g. [en] for psgs_w100")
    if fmt == "qas" and (lang or "und") == "und":
        raise ConfigError("data.lang: a qas file's questions carry no language: give it "
                          "(--lang, e.g. en for NQ), or its pairs are und -> ...")
    if fmt == "qas" and corpus_langs and not passages:
        raise ConfigError(f"data.corpus_langs={corpus_langs}: a qas file holds no passages; "
                          "it is the language of data.passages (--passages), if given")
    if fmt == "jsonl" and kind not in SCHEMAS:
        raise ConfigError(f"--kind must be one of {sorted(SCHEMAS)} for --format jsonl, "
                          f"got {kind!r}")


COLLECTION_FORMATS = ("passages", "xor-tydi", "qas", "dpr", "beir", "jsonl")  # collection_of


def collection_of(fmt: str, input: str, passages: str | None = None,
                  corpus_langs: list[str] | None = None, lang: str = "und",
                  kind: str | None = None, **_: Any) -> tuple[str, str] | None:
    """``(path, language)`` of the passage collection whose rows alone are the corpus
    (format ``passages``; ``xor-tydi``'s, ``qas``' and ``dpr``'s ``passages``, the latter
    checked against the passages the DPR file names; ``beir``'s ``corpus.jsonl``; ``jsonl``
    of kind ``corpus``, canonical rows with their own language), else None (the corpus comes
    with the other tables)."""
    if fmt == "jsonl":
        return (input, "und") if kind == "corpus" else None
    if fmt == "passages":
        return input, lang
    if fmt == "beir":
        return readers.beir_file(input, "corpus.jsonl"), lang
    if fmt == "xor-tydi" and passages:
        return passages, "en"
    if fmt == "qas" and passages:
        return passages, (corpus_langs or ["und"])[0]
    if fmt == "dpr" and passages:
        return passages, (corpus_langs or ["und"])[0]
    return None


def _unknown(fmt: str) -> ConfigError:
    return ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def write_tables(tables: readers.Tables, output: str, shard_rows: int = 2000,
                 config_hash: str = "") -> dict[str, Any]:
    """Write each table as parquet shards under ``output/<kind>/`` with manifests. A table
    may be a list or any iterable of rows (a generator is consumed shard by shard)."""
    counts = {}
    for kind, rows in tables.items():
        writer = storage.ShardWriter(storage.join(output, *kind.split("/")), config_hash)
        manifest = writer.write_rows(rows, shard_rows, SCHEMAS[kind.rsplit("/", 1)[-1]],
                                     desc=f"write {kind}")
        counts[kind] = manifest["rows"]
    return counts


def prepare(fmt: str, input: str, output: str, *, on_error: str = "fail",
            shard_rows: int = 2000, config_hash: str = "", **kw: Any) -> dict[str, Any]:
    """Convert and write; returns the summary manifest (row counts, rejected rows).

    ``config_hash`` names what is prepared (format, arguments, the input's fingerprint): a
    re-run with the same one resumes, keeping finished shards; ``output`` holding a prepare
    of another one is cleared first, so that no shard of other input or arguments is kept.
    """
    check_args(fmt, **{k: kw.get(k) for k in ("passages", "corpus_langs", "kind", "lang")})
    record = storage.join(output, "_prepare.json")  # after the checks: nothing cleared yet
    if storage.exists(record) and storage.read_json(record)["config_hash"] != config_hash:
        log.info("%s held a prepare of other input or arguments: cleared", output)
        storage.remove(output, recursive=True)
    storage.write_json(record, {"config_hash": config_hash, "format": fmt, "input": input})
    rejects = readers.Rejects(on_error)
    coll = collection_of(fmt, input, **kw)

    def collection(named: readers.NamedPassages | None = None) -> int:  # on Ray tasks
        return write_collection(*coll, storage.join(output, "corpus"),
                                storage.join(output, "_collection"), config_hash, shard_rows,
                                rejects, named=named, canonical=fmt == "jsonl")["rows"]

    if fmt == "dpr" and coll is not None:  # the corpus first: it crosses off named passages
        named = readers.NamedPassages(input, coll[0], kw.get("lang") or "und", rejects)
        counts = {"corpus": collection(named)}
        counts |= write_tables({k: named.checked(k) for k in named.tables}, output,
                               shard_rows, config_hash)
    else:
        tables = read(fmt, input, rejects=rejects, stream=True, collection=coll is None, **kw)
        counts = write_tables(tables, output, shard_rows, config_hash)
        if coll is not None:
            counts["corpus"] = collection()
    rejected_uri = storage.join(output, "_rejected.jsonl")
    if rejects.count:
        rejects.write(rejected_uri)
    else:
        storage.remove(rejected_uri)
    return storage.write_manifest(output, config_hash, format=fmt, input=input, rows=counts,
                                  rejected=rejects.count)


def run_prepare(data_cfg: Any, out_uri: str, key: str) -> dict[str, Any]:
    """Stage function: the ``data`` config section -> canonical shards under ``out_uri``."""
    d = data_cfg
    return prepare(d.format, d.input, out_uri, on_error=d.on_error, shard_rows=d.shard_rows,
                   config_hash=key, passages=d.passages, query_langs=d.query_langs,
                   corpus_langs=d.corpus_langs, test_mod=d.test_mod,
                   answer_lang=d.answer_lang, lang=d.lang)


def export_jsonl(parquet_uri: str, output: str) -> int:
    """Export a canonical parquet file or shard folder to JSONL; returns the row count.
    Streamed: one shard in memory at a time, written to the output file as it goes."""
    rows = 0
    with storage.writing_file(output) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for uri in storage.parquet_files(parquet_uri):
            for r in storage.read_parquet(uri).to_pylist():
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
                rows += 1
    return rows
