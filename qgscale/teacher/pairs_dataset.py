"""The teacher's scoring join with Ray Data, for candidate sets too large for one process.

:func:`qgscale.teacher.scoring.join_pairs` runs the join on actors that each hold every
candidate (qid, pid) pair and every query, which the driver reads, checks and indexes first:
O(training queries x candidates) in the driver and on every node (about 1.1 GB at 9M pairs).
From ``data.ray_rows_from`` candidate lists on, the same pair shards ``{qid, lang, query, pid,
passage}`` come from hash-partitioned Ray Data joins instead, as the training rows do
(:mod:`qgscale.train.rows_dataset`):

1. the workers read the candidate lists file by file, check them
   (:func:`~qgscale.teacher.scoring.check_lists`) and flatten each list's first ``first``
   pids to pairs that keep their file and row; a qid listed in two files is found by a count
   per qid;
2. the pairs join the queries on qid, then the corpus on pid; the corpus is filtered as it is
   read by a Bloom filter of the pairs' pids (:func:`~qgscale.data.joins.pid_filter`), so the
   shuffle carries the candidate passages, not the corpus;
3. the workers write the joined pairs in shards of at most ``shard_rows``, each sorted by a
   hash of the pid (then pid, qid: the pairs of a passage are adjacent, so scoring encodes
   it once; the join partitions by pid, so a passage's pairs are in one shard unless its
   partition's blocks split them).

No process holds every pair: the driver holds the file list and the Bloom filter (1.25
bytes a distinct pid, at most a pair); each of Ray Data's hash-join aggregators (min(cluster
CPUs, 128) of them) holds its share of the pairs with their texts, whatever
``data.ray_rows_partitions`` is (measured: the largest worker at 1.0 GB for 9M pairs on 2
CPUs with 8, 32 or 64 partitions, ``benchmarks/corpus_join.py``). The pairs are materialized
in the object store (spilled to disk when large): the filter is built from them before they
are joined.

Bad input raises the actors' join's errors, naming the candidate file, row and id; where
several rows are bad, the one named is the first a worker meets, not the first in file order.
Unlike the actors' join, a qid on two query rows is an error only where a pair uses it, and
every corpus row is checked (not only the candidates'). The join is not resumable part way
(its shards are rebuilt whole); once its manifest is written, a re-run of the stage reuses it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.data.corpus import corpus_shards
from qgscale.data.joins import (
    MAX_REPORTED,
    ORDER,
    check_duplicate,
    check_text,
    dataset,
    kept,
    passages_dataset,
    pid_filter,
    queries_dataset,
    unwrapped,
)
from qgscale.data.pidfilter import key_hashes
from qgscale.data.schema import CANDIDATES, QUERIES
from qgscale.errors import DataError, MissingInputError
from qgscale.teacher.scoring import (
    PAIRS,
    Cut,
    candidate_files,
    check_lists,
    file_cuts,
    repeated_qid,
)

SHARD_PAIRS = 50_000  # pairs per written shard (scoring units are row ranges of them)


def join_pairs_dataset(candidates_uri: str | list[str], queries_uri: str | list[str],
                       corpus_uri: str, out_uri: str, config_hash: str, *,
                       first: Cut = None, num_partitions: int = 64,
                       shard_rows: int = SHARD_PAIRS) -> dict[str, Any]:
    """The pair shards of :func:`qgscale.teacher.scoring.join_pairs` (each list's first
    ``first`` candidates, all without it), written by Ray Data workers under ``out_uri`` with
    the shard writer's markers and manifest; returns the manifest. ``num_partitions``: hash
    partitions of each join."""
    return unwrapped(_join, candidates_uri, queries_uri, corpus_uri, out_uri, config_hash,
                     first=first, parts=num_partitions, shard_rows=shard_rows)


def _join(candidates_uri: str | list[str], queries_uri: str | list[str], corpus_uri: str,
          out_uri: str, config_hash: str, *, first: Cut, parts: int,
          shard_rows: int) -> dict[str, Any]:
    cuts = file_cuts(candidates_uri, first)
    files = [f for f, _ in cuts]
    for uri in [queries_uri] if isinstance(queries_uri, str) else queries_uri:
        if not storage.exists(uri):  # as the actors' join (load_queries)
            raise MissingInputError(f"{uri}: queries not found")
    pairs = dataset(files, "candidates", ["qid", "pids"], check_lists).map_batches(
        _flatten, fn_args=([c for _, c in cuts],), batch_format="pyarrow").materialize()
    if len(files) > 1:  # every list is checked; within a file, check_lists finds a qid twice
        _check_repeated_qids(files)
    n_pairs = pairs.count()
    if not n_pairs:  # only empty lists: nothing to score
        storage.remove(out_uri, recursive=True)
        return storage.ShardWriter(out_uri, config_hash).finalize(
            [], pairs=0, run={"joined_by": "ray-data", "partitions": parts})

    def with_query(t: pa.Table) -> pa.Table:
        _missing(t, "lang", lambda q, p, where: f"{where}: qid={q} not in queries "
                 f"{queries_uri}", files)
        return t.rename_columns({"text": "query"})

    def with_passage(t: pa.Table) -> pa.Table:
        _missing(t, "passage", lambda q, p, where: f"{where} (qid={q}): pid={p} not in corpus "
                 f"{corpus_uri}", files)
        h = key_hashes(t.column("pid")) >> np.uint64(1)  # >= 0 as int64
        return t.select(PAIRS.names).cast(PAIRS).append_column(ORDER,
                                                                pa.array(h.astype(np.int64)))

    joined = pairs.join(queries_dataset(queries_uri), join_type="left_outer",
                        num_partitions=parts, on=("qid",)).map_batches(
        with_query, batch_format="pyarrow")
    keep = pid_filter(pairs, (storage.read_manifest(corpus_uri) or {}).get("rows"))
    joined = joined.join(passages_dataset(corpus_uri, keep),
                         join_type="left_outer", num_partitions=parts, on=("pid",)
                         ).map_batches(with_passage, batch_format="pyarrow")
    done = _write(joined, out_uri, config_hash, shard_rows)
    if done["rows"] != n_pairs:  # a pair twice: a query on two rows, or a passage
        _name_twice(out_uri, queries_uri, corpus_uri, done["twice"])
        raise RuntimeError(f"{out_uri}: {done['rows']} joined pairs for {n_pairs}")
    manifest = storage.ShardWriter(out_uri, config_hash).finalize(
        done["shards"], pairs=n_pairs, run={"joined_by": "ray-data", "partitions": parts})
    if manifest["rows"] != n_pairs:  # a shard written over by another of the same name
        storage.remove(storage.join(out_uri, storage.MANIFEST))
        raise RuntimeError(f"{out_uri}: {manifest['rows']} pairs in the shards for {n_pairs}")
    return manifest


def _write(ds: Any, out_uri: str, config_hash: str, shard_rows: int) -> dict[str, Any]:
    """Workers write the joined pairs as shards of at most ``shard_rows``, each sorted by a
    hash of the pid, then pid and qid (a passage's pairs adjacent: the join partitions by
    pid), named by its first order key and a hash of its pairs; returns the rows and the
    shard names. The folder is cleared first (never mixed with an interrupted join's shards).
    No global sort: its map tasks held whole join partitions (1.7 GB at 9M pairs)."""
    storage.remove(out_uri, recursive=True)

    def write(t: pa.Table) -> pa.Table:
        t = t.sort_by([(ORDER, "ascending"), ("pid", "ascending"), ("qid", "ascending")])
        keys = "\n".join(f"{q}\t{p}" for q, p in zip(t.column("qid").to_pylist(),
                                                    t.column("pid").to_pylist(), strict=True))
        name = (f"part-{t.column(ORDER)[0].as_py():016x}-"
                f"{hashlib.sha1(keys.encode()).hexdigest()[:8]}")
        storage.ShardWriter(out_uri, config_hash).write(name, t.select(PAIRS.names))
        return pa.table({"name": [name], "rows": [t.num_rows],
                         "first": [[t.column("qid")[0].as_py(), t.column("pid")[0].as_py()]]})

    done = ds.map_batches(write, batch_size=shard_rows, batch_format="pyarrow").take_all()
    names = sorted(r["name"] for r in done)
    # the same name twice: two batches of the same pairs (each of them twice), one file left
    twice = [r["first"] for r in done if names.count(r["name"]) > 1][:1]
    return {"rows": sum(r["rows"] for r in done), "shards": sorted(set(names)),
            "twice": twice}


def _name_twice(out_uri: str, queries_uri: str | list[str], corpus_uri: str,
                known: list[list[str]]) -> None:
    """The DataError of a (qid, pid) pair written twice (the lists are checked: one list per
    qid, a pid once in it): its qid on two query rows (both named), else its passage on two
    corpus rows. The pair is one of ``known`` (``[qid, pid]``, from shards written over by
    another of the same name), else found by a count per pair over the written shards (the
    error path only)."""
    from ray.data.aggregate import Count

    if not known:
        pairs = dataset(out_uri, "joined pairs", ["qid", "pid"]).drop_columns(["_row"])
        known = [[r["qid"], r["pid"]] for r in pairs.groupby(["qid", "pid"]).aggregate(
            Count(alias_name="n")).map_batches(lambda t: t.filter(pc.greater(t.column("n"), 1)),
                                               batch_format="pyarrow").take(1)]
    if not known:
        return
    qid, pid = known[0]
    check_duplicate({"duplicates": [f"{qid}\t{pid}"]}, queries_uri, None)
    n = sum(pc.sum(pc.equal(storage.read_parquet(f, ["pid"]).column("pid"), pid)).as_py()
            or 0 for f in corpus_shards(corpus_uri))
    raise DataError(f"{corpus_uri}: pid={pid} (a candidate of qid={qid}) is on {n} corpus "
                    "rows: a pid names one passage")


def _flatten(t: pa.Table, cuts: list[int | None]) -> pa.Table:
    """``{qid, pid, _row}``: a pair per candidate (the first ``cuts[file]`` of each list, all
    where None; the file is the high half of ``_row``), with its list's ``_row``."""
    t = t.combine_chunks()
    pids = t.column("pids").chunk(0) if t.num_rows else pa.array([], pa.list_(pa.string()))
    row = t.column("_row").to_numpy()
    stop = np.array([c or np.iinfo(np.int64).max for c in cuts], np.int64)[row >> 32]
    lengths = pc.fill_null(pc.list_value_length(pids), 0).to_numpy().astype(np.int64)
    parent = pc.list_parent_indices(pids).to_numpy()
    pos = np.arange(len(parent)) - (np.cumsum(lengths) - lengths)[parent]
    keep = np.flatnonzero(pos < stop[parent])
    return pa.table({"qid": t.column("qid").take(parent[keep]),
                     "pid": pc.list_flatten(pids).take(keep),
                     "_row": t.column("_row").take(parent[keep])})


def _where(row: int, files: list[str]) -> str:
    """``file: row r`` of a ``_row`` number (:func:`~qgscale.data.joins.dataset`)."""
    return f"{files[row >> 32]}: row {row & 0xFFFFFFFF}"


def _missing(t: pa.Table, field: str, message: Callable[[str, str, str], str],
             files: list[str]) -> None:
    """A DataError (``message(qid, pid, where)``) for the first pair of ``t`` whose joined
    ``field`` is null: its qid or pid is not on the other side."""
    null = pc.is_null(t.column(field))
    if pc.any(null).as_py():
        i = pc.index(null, True).as_py()
        raise DataError(message(t.column("qid")[i].as_py(), t.column("pid")[i].as_py(),
                                _where(t.column("_row")[i].as_py(), files)))


def _check_repeated_qids(files: list[str]) -> None:
    """A qid on lists in two files is a DataError naming both (file and row), as the driver
    join's: a count per qid, then the rows of the repeated qids (at most
    :data:`~qgscale.data.joins.MAX_REPORTED` of them) read again."""
    from ray.data.aggregate import Count

    lists = dataset(files, "candidates", ["qid"])
    counts = lists.groupby("qid").aggregate(Count(alias_name="n"))
    twice = counts.map_batches(lambda t: t.filter(pc.greater(t.column("n"), 1)).select(["qid"]),
                               batch_format="pyarrow").take(MAX_REPORTED)
    if not twice:
        return
    qids = pa.array([r["qid"] for r in twice])
    found = pa.Table.from_pylist(lists.map_batches(
        lambda t: t.filter(pc.is_in(t.column("qid"), value_set=qids)),
        batch_format="pyarrow").take_all()).sort_by("_row")
    row = found.column("_row").to_numpy()
    repeat = repeated_qid(pa.table({"qid": found.column("qid"), "file": row >> 32,
                                     "row": row & 0xFFFFFFFF}), files)
    if repeat:
        raise DataError(repeat[1])


def generated_candidates_dataset(candidates_uri: str, queries_uri: str, qrels_uri: str,
                                 generated_uri: str, out_uri: str, first: int | None = None,
                                 *, num_partitions: int = 64) -> tuple[str, str]:
    """The inputs of :func:`qgscale.teacher.scoring.generated_candidates` (KD on generated
    queries: each generated query of a positive passage with the union of the candidate
    lists, their first ``first``, of the training queries in other languages that have that
    positive), built by Ray Data workers: the positive qrels join the candidate lists and
    the queries' languages on qid, then the generated queries (filtered as read by a Bloom
    filter of the positives' pids) on pid; the lists are united per generated query and
    written as ``out_uri/{candidates, queries}/part-*.parquet``. Returns their URIs."""
    return unwrapped(_generated, candidates_uri, queries_uri, qrels_uri, generated_uri,
                     out_uri, first=first, parts=num_partitions)


def _generated(candidates_uri: str, queries_uri: str, qrels_uri: str, generated_uri: str,
               out_uri: str, *, first: int | None, parts: int) -> tuple[str, str]:
    from qgscale.train.data import generated_qid
    from qgscale.train.rows_dataset import positive_qrels

    for uri, what in ((generated_uri, "generated queries"), (queries_uri, "queries"),
                      (qrels_uri, "qrels")):
        if not storage.exists(uri):  # as the driver's
            raise MissingInputError(f"{uri}: {what} not found")
    q_uri, c_uri = storage.join(out_uri, "queries"), storage.join(out_uri, "candidates")
    storage.remove(out_uri, recursive=True)

    def empty() -> tuple[str, str]:  # no generated query gets a list: empty tables, readable
        storage.write_parquet(storage.join(q_uri, "part-00000.parquet"), QUERIES.empty_table())
        storage.write_parquet(storage.join(c_uri, "part-00000.parquet"),
                              CANDIDATES.empty_table())
        return c_uri, q_uri

    # no generated query at all (each one empty or repeated: dropped) leaves nothing to join
    # (and an empty parquet file reads as blocks without columns, which a join cannot key)
    if not sum(m.num_rows for m in storage.footers(storage.parquet_files(generated_uri))):
        return empty()
    pos = positive_qrels(qrels_uri).map_batches(
        lambda t: t.select(["qid", "pid", "_row"]).rename_columns(["qid", "pid", "_qrel"]),
        batch_format="pyarrow")

    def sliced(t: pa.Table) -> pa.Table:
        return pa.table({"qid": t.column("qid"), "pids": pc.list_slice(t.column("pids"), 0, first)
                         if first else t.column("pids")})

    lists = dataset(candidate_files(candidates_uri), "candidates", ["qid", "pids"],
                    check_lists).map_batches(sliced, batch_format="pyarrow")
    langs = queries_dataset(queries_uri).select_columns(["qid", "lang"])
    pos = pos.join(lists, join_type="inner", num_partitions=parts, on=("qid",)).join(
        langs, join_type="left_outer", num_partitions=parts, on=("qid",)).materialize()
    gen = dataset(generated_uri, "generated queries", ["pid", "lang", "query"],
                  check_text("pid", ("lang", "query"))).map_batches(
        lambda t, keep: kept(t, keep).select(["pid", "lang", "query"]).rename_columns(
            ["pid", "glang", "gquery"]), fn_args=(pid_filter(pos),), batch_format="pyarrow")

    def other_language(t: pa.Table) -> pa.Table:
        t = t.filter(pc.fill_null(pc.not_equal(t.column("lang"), t.column("glang")), True))
        return t.append_column("gid", pa.array([generated_qid(p, g, q) for p, g, q in zip(
            *(t.column(c).to_pylist() for c in ("pid", "glang", "gquery")), strict=True)],
            pa.string()))

    def united(t: pa.Table) -> pa.Table:
        t = t.sort_by("_qrel")  # the positives' table order, as the driver's union
        pids = dict.fromkeys(p for ps in t.column("pids").to_pylist() for p in ps)
        return pa.table({"qid": [t.column("gid")[0].as_py()],
                         "lang": [t.column("glang")[0].as_py()],
                         "text": [t.column("gquery")[0].as_py()], "pids": [list(pids)]})

    rows = gen.join(pos, join_type="inner", num_partitions=parts, on=("pid",)).map_batches(
        other_language, batch_format="pyarrow")
    grouped = rows.groupby("gid", num_partitions=parts).map_groups(united,
                                                                   batch_format="pyarrow")

    def write(t: pa.Table) -> pa.Table:
        t = t.filter(pc.greater(pc.list_value_length(t.column("pids")), 0)).sort_by("qid")
        if not t.num_rows:
            return pa.table({"rows": [0]})
        name = f"part-{t.column('qid')[0].as_py()}.parquet"  # gids are distinct
        storage.write_parquet(storage.join(q_uri, name), t.select(["qid", "lang", "text"]).cast(
            QUERIES))
        storage.write_parquet(storage.join(c_uri, name), pa.table({
            "qid": t.column("qid"), "pids": t.column("pids"),
            "scores": pa.nulls(t.num_rows, CANDIDATES.field("scores").type)}).cast(CANDIDATES))
        return pa.table({"rows": [t.num_rows]})

    n = sum(r["rows"] for r in grouped.map_batches(write, batch_format="pyarrow").take_all())
    return (c_uri, q_uri) if n else empty()
