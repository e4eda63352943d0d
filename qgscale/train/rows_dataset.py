"""Training rows built with Ray Data, for query sides too large for one process.

:func:`qgscale.train.data.build_student_rows` plans every row on the driver: O(training
queries x passages per row) memory, fine for XOR-TyDi's ~100k queries, not for 100M. Here the
same rows (the same per-query functions, the same seeded draws: identical output) come from
hash-partitioned Ray Data joins, and workers write the shards:

1. positives (examples or qrels, grouped by qid in table order) join queries, candidates and
   the generated queries of their positive passages on qid, and each row is planned
   (:func:`~qgscale.train.data.plan_row`);
2. teacher scores, grouped by qid, join the plans on the query's and on the generated query's
   id (:func:`~qgscale.train.data.attach_scores`); rows short of hard negatives draw from one
   seeded pid sample (:func:`~qgscale.train.data.fill_negatives`);
3. the (qid, pid) pairs of every row join the corpus on pid, are grouped back by qid and
   assembled (:func:`~qgscale.train.data.assemble_row`); the corpus rows are filtered as
   they are read by a Bloom filter of those pids (:func:`pid_filter`), so the join shuffles
   the passages the rows use (and ~1% of the others), not the corpus; rows sorted as the driver's
   (:func:`~qgscale.train.data.row_order`: a hash of the qid, so that shards mix languages)
   are written as shards by the workers.

The query generator's rows (:func:`build_qg_rows_dataset`: positive qrels pairs joined with
queries and corpus) and the teacher's ranking rows (:func:`build_qg_rank_rows_dataset`: a
seeded positive and the mined negatives of each query, as
:func:`~qgscale.train.data.build_qg_rank_rows`) are built the same way.

No process holds the corpus or the query side: the driver holds the negative sample (100k
pids), the shard list and a Bloom filter (1.25 bytes per needed (qid, pid) pair). The
datasets read twice (the row plans: for their pids, then joined with the texts; the pairs
the filter is built from; the grouped teacher scores, joined on qid and on the generated
query's id) are materialized in the object store (spilled to disk when large). Input tables
are read by the workers from their shard URIs (no filesystem object, so no credentials,
travels in the dataset). Bad input raises the same DataError as the driver join, with two
differences: a qid on two query rows is found only where the rows use it (after they are
written: :func:`check_duplicate`), and every generated-query row is checked where the
driver checks those of the positive passages.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import LossConfig
from qgscale.data.joins import (
    check_duplicate,
    check_text,
    dataset,
    kept,
    passages_dataset,
    pid_filter,
    queries_dataset,
    unwrapped,
    write_sorted,
)
from qgscale.errors import DataError
from qgscale.train import data as tdata

PLAN = pa.schema([
    ("qid", pa.string()), ("query", pa.string()), ("positive", pa.string()),
    ("pos", pa.list_(pa.string())), ("negs", pa.list_(pa.string())),
    ("cand_pids", pa.list_(pa.string())), ("gen_query", pa.string()), ("gen_qid", pa.string()),
    ("has_generated", pa.bool_()),
])
SCORED = PLAN.append(pa.field("cand_scores", pa.list_(pa.float32()))).append(
    pa.field("gen_scores", pa.list_(pa.float32()))).append(pa.field("added", pa.int64()))
ROWS_AND_COUNTS = tdata.STUDENT_ROWS.append(pa.field("_added", pa.int64())).append(
    pa.field("_generated", pa.bool_()))


def _check_nonempty_list(key: str, field: str, what: str) -> Any:
    def check(t: pa.Table, uri: str) -> None:
        lens = pc.fill_null(pc.list_value_length(t.column(field)), 0)
        if pc.any(pc.equal(lens, 0)).as_py():
            i = pc.index(pc.equal(lens, 0), True).as_py()
            raise DataError(f"{uri}: row {i} ({key}={t.column(key)[i].as_py()}): {what} "
                            f"(field {field!r})")
    return check


def _grouped(ds: Any, key: str, fields: dict[str, str], parts: int) -> Any:
    """Per ``key``: the lists of ``fields`` (new name -> column), in table order."""
    def collect(t: pa.Table) -> pa.Table:
        t = t.sort_by("_row")
        return pa.table({key: [t.column(key)[0].as_py()],
                         **{new: [t.column(c).to_pylist()] for new, c in fields.items()}})
    return ds.groupby(key, num_partitions=parts).map_groups(collect, batch_format="pyarrow")


def _positives(examples_uri: str | None, qrels_uri: str | None, parts: int
               ) -> tuple[Any, str]:
    """``{qid, pos, neg}`` per training query (lists concatenated in table order, as
    :func:`~qgscale.train.data.positives_from`) and the source table's URI."""
    if examples_uri and storage.exists(examples_uri):
        ds = dataset(examples_uri, "training examples", ["qid", "pos_pids", "neg_pids"],
                     tdata.check_examples)

        def flat(t: pa.Table) -> pa.Table:
            t = t.sort_by("_row")
            return pa.table({"qid": [t.column("qid")[0].as_py()],
                             "pos": [[p for ps in t.column("pos_pids").to_pylist() for p in ps]],
                             "neg": [[p for ps in t.column("neg_pids").to_pylist()
                                      for p in ps or []]]})
        grouped = ds.groupby("qid", num_partitions=parts)
        return grouped.map_groups(flat, batch_format="pyarrow"), examples_uri
    if not qrels_uri:
        raise DataError("training data needs training examples or qrels")
    grouped = _grouped(positive_qrels(qrels_uri), "qid", {"pos": "pid"}, parts)
    return grouped.map_batches(lambda t: t.append_column(
        "neg", pa.array([[]] * t.num_rows, pa.list_(pa.string()))), batch_format="pyarrow"), \
        qrels_uri


def build_student_rows_dataset(queries_uri: str, corpus_uri: str, out_uri: str,
                               config_hash: str, loss: LossConfig | None = None, *,
                               qrels_uri: str | None = None, examples_uri: str | None = None,
                               candidates_uri: str | None = None,
                               scores_uri: str | None = None, generated_uri: str | None = None,
                               seed: int = 13, num_partitions: int = 16,
                               shard_rows: int = 2000) -> dict[str, Any]:
    """The rows of :func:`qgscale.train.data.build_student_rows` written by Ray Data workers
    as parquet shards under ``out_uri`` (in the same order, ``shard_rows`` rows each, with the
    shard writer's markers and manifest); returns the counts. ``num_partitions``: hash
    partitions of each join."""
    return unwrapped(_build, queries_uri, corpus_uri, out_uri, config_hash,
                     loss or LossConfig(), qrels_uri=qrels_uri, examples_uri=examples_uri,
                     candidates_uri=candidates_uri, scores_uri=scores_uri,
                     generated_uri=generated_uri, seed=seed, parts=num_partitions,
                     shard_rows=shard_rows)


def build_qg_rows_dataset(queries_uri: str, corpus_uri: str, qrels_uri: str, out_uri: str,
                          config_hash: str, *, num_partitions: int = 16,
                          shard_rows: int = 2000) -> dict[str, Any]:
    """The query generator's training rows (:data:`~qgscale.train.data.QG_ROWS`, one per
    positive qrels pair: the query, its language, the passage) written by Ray Data workers
    under ``out_uri``, sorted by (:func:`~qgscale.train.data.order_key` of qid and pid, qid,
    pid); returns the counts."""
    return unwrapped(_build_qg, queries_uri, corpus_uri, qrels_uri, out_uri, config_hash,
                     parts=num_partitions, shard_rows=shard_rows)


def build_qg_rank_rows_dataset(queries_uri: str, corpus_uri: str, examples_uri: str,
                               n_negatives: int, out_uri: str, config_hash: str, *,
                               seed: int = 13, num_partitions: int = 16,
                               shard_rows: int = 2000) -> dict[str, Any]:
    """The rows of :func:`qgscale.train.data.build_qg_rank_rows` written by Ray Data workers
    under ``out_uri`` (in the same order); returns the counts."""
    return unwrapped(_build_qg_rank, queries_uri, corpus_uri, examples_uri, n_negatives,
                     out_uri, config_hash, seed=seed, parts=num_partitions,
                     shard_rows=shard_rows)


def _build(queries_uri: str, corpus_uri: str, out_uri: str, config_hash: str,
           loss: LossConfig, *, qrels_uri: str | None, examples_uri: str | None,
           candidates_uri: str | None, scores_uri: str | None, generated_uri: str | None,
           seed: int, parts: int, shard_rows: int) -> dict[str, Any]:
    if (candidates_uri or scores_uri) and not (candidates_uri and scores_uri):
        raise DataError("distillation needs both candidates and teacher scores")

    def join(left: Any, right: Any, on: str) -> Any:
        return left.join(right, join_type="left_outer", num_partitions=parts, on=(on,))

    pos, pos_uri = _positives(examples_uri, qrels_uri, parts)
    if generated_uri or candidates_uri:  # read twice: joined, and its pids or list lengths
        pos = pos.materialize()
    rows = join(pos, queries_dataset(queries_uri), "qid")
    if candidates_uri:
        # only the head of each list a row reads goes through the join (mine.top_k: 100)
        most = pos.map_batches(lambda t: pa.table({"n": [pc.max(pc.list_value_length(
            t.column("pos"))).as_py() or 0]}), batch_format="pyarrow").max("n") or 0
        keep = tdata.candidates_read(loss, most)
        cands = dataset(candidates_uri, "candidates", ["qid", "pids"], _check_nonempty_list(
            "qid", "pids", "empty candidate list")).map_batches(
            lambda t: pa.table({"qid": t.column("qid"),
                                "pids": pc.list_slice(t.column("pids"), 0, keep)}),
            batch_format="pyarrow")
        rows = join(rows, cands, "qid")
    if generated_uri:  # the generated queries of each training query's positive passages
        qp = pos.flat_map(lambda r: [{"qid": r["qid"], "pid": p} for p in sorted(set(r["pos"]))]
                          ).materialize()
        gen = dataset(generated_uri, "generated queries", ["pid", "lang", "query"],
                      check_text("pid", ("lang", "query"))).map_batches(
            kept, fn_args=(pid_filter(qp),), batch_format="pyarrow"
        ).rename_columns({"lang": "glang", "query": "gquery"})  # those of the positives
        pairs = qp.join(gen, join_type="inner", num_partitions=parts, on=("pid",))
        rows = join(rows, _grouped(pairs, "qid", {"g_pid": "pid", "g_lang": "glang",
                                                  "g_query": "gquery"}, parts), "qid")

    def plan(t: pa.Table) -> pa.Table:
        out = []
        for r in t.to_pylist():
            if r.get("lang") is None:
                raise DataError(f"{pos_uri}: qid={r['qid']} not in queries {queries_uri}")
            if candidates_uri and r.get("pids") is None:
                raise DataError(f"{candidates_uri}: no candidate list for training "
                                f"qid={r['qid']}")
            gens = list(zip(r.get("g_pid") or [], r.get("g_lang") or [],
                            r.get("g_query") or [], strict=True))
            out.append(tdata.plan_row(r["qid"], r["lang"], r["text"], r["pos"], r["neg"],
                                      r.get("pids"), gens, loss, seed))
        return pa.Table.from_pylist(out, schema=PLAN)

    plans = rows.map_batches(plan, batch_format="pyarrow")
    if scores_uri:
        scores = _grouped(dataset(scores_uri, "teacher scores", ["qid", "pid", "score"],
                                  tdata.check_scores), "qid", {"s_pid": "pid", "s_score": "score"},
                          parts).materialize()  # joined twice: on qid and on gen_qid
        plans = join(plans, scores, "qid")
        plans = join(plans, scores.rename_columns(
            {"qid": "gen_qid", "s_pid": "gs_pid", "s_score": "gs_score"}), "gen_qid")

    n = loss.n_hard_negatives
    sample = tdata.random_negative_sample(corpus_uri, seed) if n else []

    def scored(t: pa.Table) -> pa.Table:
        out = []
        for r in t.to_pylist():
            known = {(r["qid"], p): s for p, s in zip(r.get("s_pid") or [],
                                                      r.get("s_score") or [], strict=True)}
            known.update({(r["gen_qid"], p): s for p, s in zip(
                r.get("gs_pid") or [], r.get("gs_score") or [], strict=True)})
            tdata.attach_scores(r, lambda q, p, k=known: tdata._score(
                k, q, p, scores_uri, candidates_uri))
            r["added"] = tdata.fill_negatives(r, sample, n, seed, corpus_uri)
            out.append({k: r[k] for k in SCORED.names})
        return pa.Table.from_pylist(out, schema=SCORED)

    plans = plans.map_batches(scored, batch_format="pyarrow").materialize()  # read twice
    full = join(plans, _texts(plans.flat_map(lambda r: [
        {"qid": r["qid"], "pid": p} for p in sorted(set(tdata.needed_pids(r)))]).materialize(),
        corpus_uri, parts), "qid")

    def assemble(t: pa.Table) -> pa.Table:
        out = []
        for r in t.to_pylist():
            found = {p: x for p, x in zip(r["t_pid"], r["t_text"], strict=True)
                     if x is not None}
            row = tdata.assemble_row(r, found, corpus_uri, pos_uri, candidates_uri)
            out.append(row | {"_added": r["added"], "_generated": r["has_generated"]})
        return pa.Table.from_pylist(out, schema=ROWS_AND_COUNTS)

    done = write_sorted(_in_row_order(full.map_batches(assemble, batch_format="pyarrow")),
                        out_uri, config_hash, shard_rows, tdata.STUDENT_ROWS.names)
    check_duplicate(done, queries_uri, candidates_uri)
    counts = {"rows": done["rows"], "random_negatives": done.get("_added", 0),
              "without_generated": (done["rows"] - done.get("_generated", 0)
                                    if generated_uri else 0),
              "shards": done["shards"]}
    if not counts["rows"]:
        raise DataError(f"{pos_uri}: no training examples")
    if generated_uri and counts["without_generated"] == counts["rows"]:
        raise DataError(f"{generated_uri}: no generated query in another language for any "
                        "training query's positive passage")
    storage.ShardWriter(out_uri, config_hash).finalize(counts.pop("shards"), **counts)
    return counts


def positive_qrels(qrels_uri: str) -> Any:
    """The qrels rows with ``rel > 0``."""
    return dataset(qrels_uri, "qrels", ["qid", "pid", "rel"],
                   tdata.check_positive_qrels).map_batches(
        lambda t: t.filter(pc.fill_null(pc.greater(t.column("rel"), 0), False)),
        batch_format="pyarrow")


def _texts(need: Any, corpus_uri: str, parts: int) -> Any:
    """Per qid of ``need`` (``{qid, pid}`` rows, materialized): ``t_pid`` and ``t_text``
    (None where the pid is not in the corpus), joined on a hash-partitioned pid with the
    corpus rows of ``need``'s pids (:func:`pid_filter`)."""
    texts = need.join(passages_dataset(corpus_uri, pid_filter(need)), join_type="left_outer",
                      num_partitions=parts, on=("pid",))
    return texts.groupby("qid", num_partitions=parts).map_groups(lambda t: pa.table({
        "qid": [t.column("qid")[0].as_py()], "t_pid": [t.column("pid").to_pylist()],
        "t_text": [t.column("passage").to_pylist()]}), batch_format="pyarrow")


def _build_qg(queries_uri: str, corpus_uri: str, qrels_uri: str, out_uri: str,
              config_hash: str, *, parts: int, shard_rows: int) -> dict[str, Any]:
    pairs = positive_qrels(qrels_uri).materialize()
    rows = pairs.join(queries_dataset(queries_uri), join_type="left_outer", num_partitions=parts,
                      on=("qid",))
    rows = rows.join(passages_dataset(corpus_uri, pid_filter(pairs)), join_type="left_outer",
                     num_partitions=parts, on=("pid",))

    def check(t: pa.Table) -> pa.Table:
        for field, what, uri in (("lang", "qid", queries_uri), ("passage", "pid", corpus_uri)):
            missing = pc.is_null(t.column(field))
            if pc.any(missing).as_py():
                i = pc.index(missing, True).as_py()
                raise DataError(f"{qrels_uri}: qid={t.column('qid')[i].as_py()}: "
                                f"{what}={t.column(what)[i].as_py()} not in "
                                f"{'queries' if what == 'qid' else 'corpus'} {uri}")
        return t.select(["qid", "pid", "lang", "passage"]).append_column(
            "query", t.column("text"))

    done = write_sorted(_in_row_order(rows.map_batches(check, batch_format="pyarrow"),
                                      ("qid", "pid")),
                        out_uri, config_hash, shard_rows, tdata.QG_ROWS.names)
    check_duplicate(done, queries_uri, None)  # a query twice
    if done["duplicates"]:  # else a qrels pair twice, or its passage on two corpus rows
        qid, pid = done["duplicates"][0].split("\t")
        pairs = storage.read_parquet(qrels_uri, ["qid", "pid", "rel"])
        n = pc.sum(pc.and_(pc.and_(pc.equal(pairs.column("qid"), qid),
                                   pc.equal(pairs.column("pid"), pid)),
                           pc.fill_null(pc.greater(pairs.column("rel"), 0), False))).as_py()
        if n and n > 1:
            raise DataError(f"{qrels_uri}: qid={qid}, pid={pid} has two rows (one row per "
                            "(qid, pid) pair)")
        raise DataError(f"{corpus_uri}: pid={pid} is on two corpus rows: a pid names one "
                        "passage")
    if not done["rows"]:
        raise DataError(f"{qrels_uri}: no positive (rel > 0) pairs")
    storage.ShardWriter(out_uri, config_hash).finalize(done["shards"], rows=done["rows"])
    return {"rows": done["rows"]}


def _build_qg_rank(queries_uri: str, corpus_uri: str, examples_uri: str, n_negatives: int,
                   out_uri: str, config_hash: str, *, seed: int, parts: int,
                   shard_rows: int) -> dict[str, Any]:
    pos, pos_uri = _positives(examples_uri, None, parts)
    rows = pos.join(queries_dataset(queries_uri), join_type="left_outer", num_partitions=parts,
                    on=("qid",))

    def plan(r: dict[str, Any]) -> dict[str, Any]:
        if r.get("lang") is None:
            raise DataError(f"{pos_uri}: qid={r['qid']} not in queries {queries_uri}")
        positive, negs = tdata.qg_rank_pids(r["qid"], list(r["pos"]), list(r["neg"]),
                                            n_negatives, seed)
        return {"qid": r["qid"], "query": r["text"], "lang": r["lang"],
                "pids": [positive, *negs]}

    plans = rows.map(plan).materialize()  # read twice: its pids, then joined with their texts
    full = plans.join(_texts(plans.flat_map(lambda r: [
        {"qid": r["qid"], "pid": p} for p in sorted(set(r["pids"]))]).materialize(),
        corpus_uri, parts), join_type="left_outer", num_partitions=parts, on=("qid",))

    def assemble(t: pa.Table) -> pa.Table:
        out = []
        for r in t.to_pylist():
            found = {p: x for p, x in zip(r["t_pid"], r["t_text"], strict=True)
                     if x is not None}
            for p in r["pids"]:
                if p not in found:
                    raise DataError(f"{pos_uri}: qid={r['qid']}: pid={p} not in corpus "
                                    f"{corpus_uri}")
            negs = len(r["pids"]) - 1
            out.append({"qid": r["qid"], "query": r["query"], "lang": r["lang"],
                        "passages": [found[p] for p in r["pids"]],
                        "_short": int(negs < n_negatives), "_none": int(not negs)})
        return pa.Table.from_pylist(out, schema=tdata.QG_RANK_ROWS.append(
            pa.field("_short", pa.int64())).append(pa.field("_none", pa.int64())))

    done = write_sorted(_in_row_order(full.map_batches(assemble, batch_format="pyarrow")),
                        out_uri, config_hash, shard_rows, tdata.QG_RANK_ROWS.names)
    check_duplicate(done, queries_uri, None)
    if not done["rows"]:
        raise DataError(f"{pos_uri}: no training examples")
    counts = {"rows": done["rows"], "short_lists": done.get("_short", 0),
              "no_negatives": done.get("_none", 0)}
    storage.ShardWriter(out_uri, config_hash).finalize(done["shards"], **counts)
    return counts


def _in_row_order(ds: Any, keys: tuple[str, ...] = ("qid",)) -> Any:
    """``ds`` sorted as :func:`~qgscale.train.data.in_row_order`: by the int64 order key
    column of each row's ``keys``, then ``keys``."""
    return ds.map_batches(tdata.with_order, fn_args=(keys,), batch_format="pyarrow").sort(
        [tdata.ORDER, *keys])
