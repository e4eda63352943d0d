"""Training data: join canonical tables into self-contained training rows (no torch here:
Ray Data workers import this module; the collator is :mod:`qgscale.train.batch`'s).

The driver joins queries, passages, teacher scores and generated queries into one row per
training query and writes them as parquet shards, in a hash order of the qids that mixes
languages in every shard (:func:`row_order`); every worker reads its micro-batches of
the seeded sample stream from those shards (:mod:`qgscale.train.order`) and tokenises them
with a collator in a prefetching thread, ahead of the training step. Inputs (schemas in
``qgscale.data.schema``):

- queries ``{qid, lang, text}``, corpus ``{pid, lang, title, text}``;
- positives/negatives: training examples ``{qid, pos_pids, neg_pids}``, or qrels ``{qid, pid,
  rel}`` (rel > 0 = positive) with negatives from the candidates or sampled from the corpus;
- distillation: candidates ``{qid, pids, scores}`` (each query's list C(q)), teacher scores
  ``{qid, pid, score, ntok}`` for every candidate, generated queries ``{pid, lang, query,
  logprob}`` (cross-lingual paraphrases of each positive passage's queries).

Bad input raises :class:`qgscale.errors.DataError` naming the table, qid/pid and field.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import LossConfig
from qgscale.data.corpus import read_passages, sample_pids
from qgscale.data.joins import ORDER  # the column rows are sorted by before they are written
from qgscale.data.keyindex import KeyIndex
from qgscale.data.schema import blank
from qgscale.errors import DataError
from qgscale.teacher.common import generated_of, load_queries

log = logging.getLogger(__name__)

STUDENT_ROWS = pa.schema([
    ("qid", pa.string()), ("query", pa.string()),
    ("passages", pa.list_(pa.string())),  # [positive, hard negatives...]
    ("cand_texts", pa.list_(pa.string())), ("cand_scores", pa.list_(pa.float32())),
    ("gen_query", pa.string()),  # "" when the query has no generated paraphrase
    ("gen_scores", pa.list_(pa.float32())),  # teacher scores of gen_query on C(q), or []
    # pid_key of each of ``passages`` and of every positive of the query: the contrastive
    # loss does not count another query's positive that is also one of this query's as a
    # negative (parallel queries, several questions on one passage)
    ("passage_ids", pa.list_(pa.int64())), ("positive_ids", pa.list_(pa.int64())),
])
QG_ROWS = pa.schema([("query", pa.string()), ("lang", pa.string()), ("passage", pa.string())])
QG_RANK_ROWS = pa.schema([
    ("qid", pa.string()), ("query", pa.string()), ("lang", pa.string()),
    ("passages", pa.list_(pa.string())),  # [positive, hard negatives...] (up to 1 + N)
])


def generated_qid(pid: str, lang: str, query: str) -> str:
    """Stable id of a generated query (teacher scores for it use this ``qid``)."""
    return "gen-" + hashlib.sha1(f"{pid}\t{lang}\t{query}".encode()).hexdigest()[:16]


def order_key(*ids: str) -> int:
    """Where a training row goes among the written rows: a stable 63-bit hash (blake2b) of
    the ids that name it (its ``qid``; ``qid, pid`` for the QG's rows, several per query).
    Every reader prefixes qids with the language, so rows in qid order would give shards,
    micro-batches (in-batch negatives) and runs of steps of one language; in hash order each
    shard mixes them. Rows have distinct keys, so that shards named by their first row's key
    list in row order."""
    blob = "\t".join(ids).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") >> 1


def pid_key(pid: str) -> int:
    """A passage's id in training rows (:func:`order_key` of the pid): batches compare
    passages by it across workers (``passage_ids``, ``positive_ids``)."""
    return order_key(pid)


def row_order(qid: str) -> tuple[int, str]:
    """The sort key of a training query's row: :func:`order_key`, then the qid."""
    return order_key(qid), qid


def with_order(table: pa.Table, keys: tuple[str, ...] = ("qid",)) -> pa.Table:
    """``table`` with the :data:`ORDER` column: :func:`order_key` of each row's ``keys``."""
    ids = zip(*(table.column(k).to_pylist() for k in keys), strict=True)
    return table.append_column(ORDER, pa.array([order_key(*i) for i in ids], pa.int64()))


def in_row_order(table: pa.Table, keys: tuple[str, ...] = ("qid",)) -> pa.Table:
    """``table`` sorted as training rows are written: by :func:`order_key` of ``keys``, then
    ``keys``."""
    return with_order(table, keys).sort_by([(k, "ascending") for k in (ORDER, *keys)]
                                            ).drop_columns([ORDER])


def _read(uri: str, what: str, columns: list[str] | None = None) -> pa.Table:
    if not storage.exists(uri):
        raise DataError(f"{uri}: {what} not found")
    return storage.read_parquet(uri, columns)


def check_positive_qrels(t: pa.Table, uri: str) -> None:
    """Every positive (rel > 0) row of qrels ``t`` (one file, ``uri``) has a qid and a pid:
    else a DataError naming the file, row and field (other rows are never read as pairs)."""
    pos = pc.fill_null(pc.greater(t.column("rel"), 0), False)
    for field in ("qid", "pid"):
        bad = pc.and_(pos, blank(t.column(field)))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise DataError(f"{uri}: row {i} (qid={t.column('qid')[i].as_py()}): empty field "
                            f"{field!r}")


def check_examples(t: pa.Table, uri: str) -> None:
    """Every row of training examples ``t`` (one file, ``uri``) has a qid, a positive, and no
    null or blank pid in ``pos_pids`` / ``neg_pids``: else a DataError naming file, row and
    field."""
    bad = blank(t.column("qid"))
    if pc.any(bad).as_py():
        raise DataError(f"{uri}: row {pc.index(bad, True).as_py()}: empty field 'qid'")
    for field in ("pos_pids", "neg_pids"):
        col = t.column(field).combine_chunks()
        if field == "pos_pids":
            empty = pc.fill_null(pc.equal(pc.list_value_length(col), 0), True)
            if pc.any(empty).as_py():
                i = pc.index(empty, True).as_py()
                raise DataError(f"{uri}: row {i} (qid={t.column('qid')[i].as_py()}): empty "
                                "field 'pos_pids'")
        bad = blank(pc.list_flatten(col))
        if pc.any(bad).as_py():
            i = pc.list_parent_indices(col)[pc.index(bad, True).as_py()].as_py()
            raise DataError(f"{uri}: row {i} (qid={t.column('qid')[i].as_py()}): field "
                            f"{field!r} holds an empty/null pid")


def read_checked(uri: str, what: str, check: Any, columns: list[str] | None = None
                 ) -> pa.Table:
    """The table at ``uri`` (a file or a folder of shards), each file checked by
    ``check(table, file)`` (:func:`check_positive_qrels`, :func:`check_examples`)."""
    if not storage.exists(uri):
        raise DataError(f"{uri}: {what} not found")
    parts = []
    for f in storage.parquet_files(uri):
        t = storage.read_parquet(f, columns)
        check(t, f)
        parts.append(t)
    return pa.concat_tables(parts)


def positives_from(examples_uri: str | None, qrels_uri: str | None
                   ) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """``qid -> positive pids``, ``qid -> negative pids`` and the source table's URI."""
    pos: dict[str, list[str]] = defaultdict(list)
    neg: dict[str, list[str]] = defaultdict(list)
    if examples_uri and storage.exists(examples_uri):
        t = read_checked(examples_uri, "training examples", check_examples)
        for r in t.to_pylist():
            pos[r["qid"]].extend(r["pos_pids"])
            neg[r["qid"]].extend(r["neg_pids"] or [])
        return dict(pos), dict(neg), examples_uri
    if not qrels_uri:
        raise DataError("training data needs training examples or qrels")
    for r in read_checked(qrels_uri, "qrels", check_positive_qrels).to_pylist():
        if r["rel"] and r["rel"] > 0:
            pos[r["qid"]].append(r["pid"])
    if not pos:
        raise DataError(f"{qrels_uri}: no positive (rel > 0) pairs")
    return dict(pos), dict(neg), qrels_uri


def candidates_read(loss: LossConfig, most_positives: int) -> int:
    """How much of a candidate list a row reads (:func:`plan_row`): its first
    ``n_candidates``, and its negatives from the head of the list less its positives (at most
    ``most_positives`` of them)."""
    return max(loss.n_candidates, loss.n_hard_negatives + most_positives)


def load_candidates(candidates_uri: str, keep: int | None = None) -> dict[str, list[str]]:
    """Each query's candidate list (none may be empty; one per qid), its first ``keep`` only
    when given (cut in Arrow file by file: a row reads a list's head, and ``mine.top_k``
    may keep 100)."""
    if not storage.exists(candidates_uri):
        raise DataError(f"{candidates_uri}: candidates not found")
    cands: dict[str, list[str]] = {}
    for f in storage.parquet_files(candidates_uri):
        t = storage.read_parquet(f, ["qid", "pids"])
        empty = pc.fill_null(pc.less_equal(pc.list_value_length(t.column("pids")), 0), True)
        if pc.any(empty).as_py():
            i = pc.index(empty, True).as_py()
            raise DataError(f"{f}: row {i} (qid={t.column('qid')[i].as_py()}): empty candidate "
                            "list (field 'pids')")
        pids = pc.list_slice(t.column("pids"), 0, keep) if keep else t.column("pids")
        for q, ps in zip(t.column("qid").to_pylist(), pids.to_pylist(), strict=True):
            if q in cands:
                raise DataError(f"{candidates_uri}: qid={q} has two rows (one candidate list "
                                "per qid)")
            cands[q] = ps
    return cands


def check_scores(t: pa.Table, uri: str) -> None:
    """Every ``score`` of ``t`` (read from ``uri``) is a finite number."""
    score = t.column("score")
    bad = pc.fill_null(pc.invert(pc.is_finite(score)), True)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise DataError(f"{uri}: row {i} (qid={t.column('qid')[i].as_py()}, "
                        f"pid={t.column('pid')[i].as_py()}): field 'score' is "
                        f"{score[i].as_py()!r}")


def load_scores(scores_uri: str, pairs: set[tuple[str, str]]
                ) -> dict[tuple[str, str], float]:
    """The teacher scores of the ``(qid, pid)`` ``pairs`` that rows use, read one shard at a
    time and filtered in Arrow: memory O(pairs), not the scores table (the first
    ``n_candidates`` of every query's and generated query's list, the pairs of every row).
    Every score read is checked (:func:`check_scores`)."""
    if not storage.exists(scores_uri):
        raise DataError(f"{scores_uri}: teacher scores not found")
    wanted = KeyIndex.of((f"{q}\t{p}" for q, p in pairs), "key")  # built once, not per shard
    out: dict[tuple[str, str], float] = {}
    for uri in storage.parquet_files(scores_uri):
        t = storage.read_parquet(uri, ["qid", "pid", "score"])
        check_scores(t, uri)
        t = t.filter(wanted.contains(pc.binary_join_element_wise(
            t.column("qid"), t.column("pid"), "\t")))
        out.update(zip(zip(t.column("qid").to_pylist(), t.column("pid").to_pylist(),
                           strict=True), t.column("score").to_pylist(), strict=True))
    return out


def _score(scores: dict, qid: str, pid: str, scores_uri: str, candidates_uri: str) -> float:
    try:
        return scores[(qid, pid)]
    except KeyError:
        raise DataError(f"{scores_uri}: missing teacher score for qid={qid} pid={pid} "
                        f"(a candidate in {candidates_uri})") from None


def query_rng(seed: int, qid: str, what: str) -> random.Random:
    """The seeded random stream of one training query's ``what`` ("row", "neg"): a row's
    draws depend on the seed and its qid only, so rows built on the driver, or by Ray Data
    workers in any order (:mod:`qgscale.train.rows_dataset`), are identical."""
    return random.Random(f"{seed}:{what}:{qid}")


def plan_row(qid: str, lang: str, query: str, pos: list[str], neg: list[str] | None,
             cand: list[str] | None, gens: list[tuple[str, str, str]], loss: LossConfig,
             seed: int) -> dict[str, Any]:
    """One training query's row as pids: a seeded positive, hard negatives (``neg``, else
    the non-positive candidates in rank order), the first ``n_candidates`` candidates and
    one generated query in another language drawn from ``gens`` ``(pid, lang, query)`` of
    its positives (``gen_qid`` names its teacher scores when ``kd_on_generated``)."""
    rng = query_rng(seed, qid, "row")
    positive = rng.choice(pos)
    pos_set = sorted(set(pos))
    pool = [p for p in (neg or cand or []) if p not in pos_set]
    cand_pids = (cand or [])[:loss.n_candidates]
    options = sorted(g for g in gens if g[1] != lang)
    gen_query, gen_qid = "", ""
    if options:
        gpid, gl, gen_query = rng.choice(options)
        if loss.kd_on_generated and cand_pids:
            gen_qid = generated_qid(gpid, gl, gen_query)
    return {"qid": qid, "query": query, "positive": positive, "pos": pos_set,
            "negs": pool[:loss.n_hard_negatives], "cand_pids": cand_pids,
            "gen_query": gen_query, "gen_qid": gen_qid, "has_generated": bool(options)}


def fill_negatives(plan: dict[str, Any], sample: list[str], n: int, seed: int,
                   corpus_uri: str) -> int:
    """Top ``plan`` up to ``n`` negatives with random passages from ``sample`` (a seeded
    uniform sample of the corpus pid column, :func:`random_negative_sample`): not its
    positives, no repeats; returns how many were added."""
    negs, pos = list(plan["negs"]), set(plan["pos"])
    if len(negs) >= n:
        return 0
    if len(sample) < 2 * (len(pos) + n):  # a small corpus: check there are enough
        options = [p for p in sample if p not in pos and p not in negs]
        if len(options) < n - len(negs):
            raise DataError(f"{corpus_uri}: too few passages for {n} negatives "
                            f"(qid={plan['qid']})")
    rng, added = query_rng(seed, plan["qid"], "neg"), 0
    while len(negs) < n:
        p = rng.choice(sample)
        if p not in pos and p not in negs:
            negs.append(p)
            added += 1
    plan["negs"] = negs
    return added


RANDOM_NEGATIVE_SAMPLE = 100_000


def random_negative_sample(corpus_uri: str, seed: int) -> list[str]:
    """The pids random negatives are drawn from: a seeded uniform sample of at most
    :data:`RANDOM_NEGATIVE_SAMPLE` (O(sample) memory, never the corpus)."""
    return sample_pids(corpus_uri, RANDOM_NEGATIVE_SAMPLE, seed)


def attach_scores(plan: dict[str, Any], score: Any) -> None:
    """The teacher scores of the row's candidates for its query and its generated query;
    ``score(qid, pid)`` raises a DataError naming a missing one."""
    plan["cand_scores"] = [score(plan["qid"], p) for p in plan["cand_pids"]]
    plan["gen_scores"] = [score(plan["gen_qid"], p) for p in plan["cand_pids"]] \
        if plan["gen_qid"] else []


def needed_pids(plan: dict[str, Any]) -> list[str]:
    """Every passage the row reads."""
    return [*plan["pos"], *plan["negs"], *plan["cand_pids"]]


def assemble_row(plan: dict[str, Any], texts: Any, corpus_uri: str, pos_uri: str,
                 candidates_uri: str | None) -> dict[str, Any]:
    """The :data:`STUDENT_ROWS` row of ``plan`` with the passage ``texts`` (pid -> text); a
    pid the corpus lacks is a DataError naming the table, query and field."""
    for where, field, pids in ((pos_uri, "positive", plan["pos"]),
                               (pos_uri, "negative", plan["negs"]),
                               (candidates_uri, "candidate", plan["cand_pids"])):
        for p in sorted(pids):
            if p not in texts:
                raise DataError(f"{where}: qid={plan['qid']}: {field} pid={p} not in corpus "
                                f"{corpus_uri}")
    return {"qid": plan["qid"], "query": plan["query"],
            "passages": [texts[p] for p in (plan["positive"], *plan["negs"])],
            "cand_texts": [texts[p] for p in plan["cand_pids"]],
            "cand_scores": plan["cand_scores"], "gen_query": plan["gen_query"],
            "gen_scores": plan["gen_scores"],
            "passage_ids": [pid_key(p) for p in (plan["positive"], *plan["negs"])],
            "positive_ids": [pid_key(p) for p in plan["pos"]]}


def build_student_rows(queries_uri: str, corpus_uri: str, loss: LossConfig | None = None, *,
                       qrels_uri: str | None = None, examples_uri: str | None = None,
                       candidates_uri: str | None = None, scores_uri: str | None = None,
                       generated_uri: str | None = None, seed: int = 13
                       ) -> tuple[pa.Table, dict[str, Any]]:
    """Rows of :data:`STUDENT_ROWS` (one per training query, in :func:`row_order`) and counts for
    the manifest, joined on the driver: O(training queries x passages per row) memory, the
    corpus read by the semi-join. :mod:`qgscale.train.rows_dataset` builds the same rows
    with Ray Data when the query side is too large for one process.

    ``loss`` (the stage's :class:`~qgscale.config.LossConfig`; default ``LossConfig()``) gives
    ``n_hard_negatives``, ``n_candidates`` and ``kd_on_generated``. Hard negatives: the
    examples' ``neg_pids``, else the candidates that are not positives (in rank order), else
    random corpus passages; the count of randomly filled negatives is reported. With
    ``candidates_uri``/``scores_uri`` each row carries its first ``n_candidates`` candidates and
    their teacher scores. With ``generated_uri`` a row gets one generated query in another
    language, from one of its positive passages (:func:`plan_row`).
    """
    loss = loss or LossConfig()
    queries = load_queries(queries_uri)
    pos, neg, pos_uri = positives_from(examples_uri, qrels_uri)
    cands: dict[str, list[str]] = {}
    if candidates_uri or scores_uri:
        if not (candidates_uri and scores_uri):
            raise DataError("distillation needs both candidates and teacher scores")
        cands = load_candidates(candidates_uri, candidates_read(
            loss, max(map(len, pos.values()), default=0)))
    gens: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # pid -> [(pid, l, q)]
    if generated_uri:  # only those of the positive passages (not of the whole table)
        for g in generated_of(generated_uri, {p for ps in pos.values() for p in ps}):
            gens[g[0]].append(g)
    counts = {"rows": 0, "random_negatives": 0, "without_generated": 0}
    plans = []  # per training query, the pids of its row (texts are read once, below)
    for qid in sorted(pos):  # bad input is named in qid order
        if qid not in queries:
            raise DataError(f"{pos_uri}: qid={qid} not in queries {queries_uri}")
        if cands and qid not in cands:
            raise DataError(f"{candidates_uri}: no candidate list for training qid={qid}")
        lang, qtext = queries[qid]
        plan = plan_row(qid, lang, qtext, pos[qid], neg.get(qid), cands.get(qid),
                        [g for p in set(pos[qid]) for g in gens.get(p, [])], loss, seed)
        counts["without_generated"] += bool(generated_uri) and not plan["has_generated"]
        plans.append(plan)
    scores = load_scores(scores_uri, {  # only the scores the rows carry
        (q, p) for r in plans for q in (r["qid"], r["gen_qid"]) if q for p in r["cand_pids"]}
    ) if scores_uri else {}
    for r in plans:
        attach_scores(r, lambda q, p: _score(scores, q, p, scores_uri, candidates_uri))
    plans.sort(key=lambda r: row_order(r["qid"]))
    if generated_uri and counts["without_generated"] == len(plans):
        raise DataError(f"{generated_uri}: no generated query in another language for any "
                        "training query's positive passage")
    if any(len(r["negs"]) < loss.n_hard_negatives for r in plans):
        sample = random_negative_sample(corpus_uri, seed)
        counts["random_negatives"] = sum(
            fill_negatives(r, sample, loss.n_hard_negatives, seed, corpus_uri) for r in plans)
    # the semi-join: read only the passages the rows use, one corpus shard at a time
    texts = read_passages(corpus_uri, {p for r in plans for p in needed_pids(r)})
    rows = [assemble_row(r, texts, corpus_uri, pos_uri, candidates_uri) for r in plans]
    counts["rows"] = len(rows)
    return pa.Table.from_pylist(rows, schema=STUDENT_ROWS), counts


def qg_rank_pids(qid: str, pos: list[str], neg: list[str], n_negatives: int, seed: int
                 ) -> tuple[str, list[str]]:
    """One training query's qg-rank passages: a positive (seeded by ``(seed, qid)``) and its
    first ``n_negatives`` mined negatives that are not positives."""
    positives = set(pos)
    return (query_rng(seed, qid, "qg-rank").choice(pos),
            [p for p in neg if p not in positives][:n_negatives])


def build_qg_rank_rows(queries_uri: str, corpus_uri: str, examples_uri: str,
                       n_negatives: int, seed: int = 13) -> tuple[pa.Table, dict[str, Any]]:
    """Rows of :data:`QG_RANK_ROWS` for the teacher's ranking fine-tune, one per training
    example ``{qid, pos_pids, neg_pids}`` (``mine/train``) in :func:`row_order`: the query, its
    language, one of its positives and its first ``n_negatives`` mined hard negatives
    (:func:`qg_rank_pids`).

    A query with fewer negatives keeps the ones it has (the collator masks the rest); the
    counts (``short_lists``, ``no_negatives``) go to the manifest. The driver join, for up to
    ``data.ray_rows_from`` queries; :mod:`qgscale.train.rows_dataset` builds the same rows
    with Ray Data.
    """
    queries = load_queries(queries_uri)
    pos, neg, pos_uri = positives_from(examples_uri, None)
    picked = {q: qg_rank_pids(q, pos[q], neg.get(q, []), n_negatives, seed) for q in pos}
    corpus = read_passages(corpus_uri, {p for pp, nn in picked.values() for p in (pp, *nn)})
    counts = {"rows": 0, "short_lists": 0, "no_negatives": 0}
    rows = []
    for qid in sorted(pos):
        if qid not in queries:
            raise DataError(f"{pos_uri}: qid={qid} not in queries {queries_uri}")
        lang, qtext = queries[qid]
        positive, negs = picked[qid]
        for p in (positive, *negs):
            if p not in corpus:
                raise DataError(f"{pos_uri}: qid={qid}: pid={p} not in corpus {corpus_uri}")
        counts["short_lists"] += len(negs) < n_negatives
        counts["no_negatives"] += not negs
        rows.append({"qid": qid, "query": qtext, "lang": lang,
                     "passages": [corpus[positive]] + [corpus[p] for p in negs]})
    rows.sort(key=lambda r: row_order(r["qid"]))
    if not rows:
        raise DataError(f"{pos_uri}: no training examples")
    counts["rows"] = len(rows)
    return pa.Table.from_pylist(rows, schema=QG_RANK_ROWS), counts


def write_rows(table: pa.Table, uri: str, shard_rows: int, config_hash: str,
               **manifest: Any) -> list[str]:
    """Write ``table`` as parquet shards under ``uri``, the manifest with ``manifest``
    fields; shard URIs. The folder is cleared first: the table is the whole set of rows, and
    training reads every shard of the folder (an interrupted Ray Data build leaves shards of
    other names)."""
    storage.remove(uri, recursive=True)
    writer = storage.ShardWriter(uri, config_hash)
    manifest = writer.write_table(table, shard_rows, **manifest)
    return [writer.shard_uri(s["name"]) for s in manifest["shards"]]
