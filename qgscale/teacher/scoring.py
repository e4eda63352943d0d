"""``qgscale teacher score``: teacher scores of the (query, candidate passage) pairs that
distillation reads (each candidate list's first ``distill.loss.n_candidates``).

Input: candidate shards ``{qid, pids, scores?}`` + queries ``{qid, lang, text}`` + corpus
``{pid, lang, title, text}`` (parquet, local or ``s3://``). Output: shards
``{qid, pid, score, ntok}`` (``qgscale.data.schema.SCORES``), one per ~``shard_pairs`` pairs,
with done markers and a manifest.

Two shard jobs (:func:`qgscale.runtime.run_shards`), both resumable:

1. the join (:class:`PairJob`): per corpus shard, the candidate pairs of its passages with
   both texts, written under ``<out>/_pairs/`` sorted by pid: the work units carry their text,
   so no actor ever loads the corpus (each corpus shard is read once);
2. scoring (:class:`ScoreJob`): per unit of ``shard_pairs`` pairs (or fewer, so that every
   actor gets at least two units; consecutive row ranges of the pair shards, across shards
   where they are small: :func:`plan_units`), the passage-grouped fast path of
   :func:`qgscale.models.generator.score_pairs`.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import ScoreConfig
from qgscale.data.corpus import corpus_shards, scan
from qgscale.data.keyindex import KeyIndex
from qgscale.data.pidfilter import pid_sum
from qgscale.data.schema import SCORES, blank, passage_text
from qgscale.errors import DataError, MissingInputError
from qgscale.runtime import Shard, connect, planned_unit_rows, run_shards
from qgscale.teacher.common import QGSpec, generated_of, load_queries, qg_spec

PAIRS = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("query", pa.string()),
                   ("pid", pa.string()), ("passage", pa.string())])


def _files(uri: str) -> list[str]:
    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise MissingInputError(f"{uri}: candidates not found (run `qgscale index mine` "
                                "first)")
    return storage.parquet_files(uri)


Cut = int | None | list[int | None]  # each list's first n (None: all), or one per set


def candidate_files(candidates_uri: str | list[str]) -> list[str]:
    """The parquet files of one or several candidate sets, in order."""
    return [f for f, _ in file_cuts(candidates_uri, None)]


def file_cuts(candidates_uri: str | list[str], first: Cut) -> list[tuple[str, int | None]]:
    """The parquet files of one or several candidate sets, in order, each with the cut of its
    set: ``first`` for every set, or a list of one per set (the generated queries' lists are
    unions of first-n lists already, and are scored whole)."""
    uris = [candidates_uri] if isinstance(candidates_uri, str) else candidates_uri
    cuts = first if isinstance(first, list) else [first] * len(uris)
    if len(cuts) != len(uris):
        raise ValueError(f"{len(cuts)} cuts for {len(uris)} candidate sets")
    return [(f, c) for u, c in zip(uris, cuts, strict=True) for f in _files(u)]


def candidate_lists(candidates_uri: str | list[str]) -> int:
    """How many candidate lists (queries) there are, from the parquet footers."""
    return sum(m.num_rows for m in storage.footers(candidate_files(candidates_uri)))


def candidate_pairs(candidates_uri: str | list[str], first: Cut = None) -> pa.Table:
    """Every (qid, pid) candidate pair, with the file and row it came from (for errors);
    with ``first``, only the first ``first`` of each list (the ones training rows read:
    ``distill.loss.n_candidates``; :func:`file_cuts`).

    Validates the lists on the way, naming file, row and field: :func:`check_lists` file by
    file, then a qid on two rows over all files. O(queries x k) in Arrow, never the corpus.
    """
    cuts = file_cuts(candidates_uri, first)
    files = [f for f, _ in cuts]
    parts, lists = [], []
    for n, (f, cut) in enumerate(cuts):
        t = storage.read_parquet(f, ["qid", "pids"]).combine_chunks()
        check_lists(t, f)
        kept = pc.list_slice(t["pids"], 0, cut) if cut else t["pids"]
        rows = pc.list_parent_indices(kept)
        parts.append(pa.table({"qid": t["qid"].take(rows), "pid": pc.list_flatten(kept),
                               "file": pa.DictionaryArray.from_arrays(  # the URI once
                                   pa.array(np.zeros(len(rows), np.int32)), pa.array([f])),
                               "row": rows}))
        lists.append(_lists(t, n))
    repeat = repeated_qid(pa.concat_tables(lists), files)
    if repeat:
        raise DataError(repeat[1])
    return pa.concat_tables(parts).combine_chunks()


def _lists(t: pa.Table, n: int) -> pa.Table:
    """``{qid, file, row}`` of candidate lists ``t`` read from file number ``n``."""
    return pa.table({"qid": t["qid"], "file": np.full(t.num_rows, n, np.int32),
                     "row": np.arange(t.num_rows)})


def repeated_qid(lists: pa.Table, files: list[str]) -> tuple[int, str] | None:
    """The first row of ``lists`` (:func:`_lists`, in file and row order) whose qid an
    earlier row has, as ``(row, message naming both)``; None when every qid is once."""
    if pc.count_distinct(lists.column("qid")).as_py() == lists.num_rows:
        return None
    n = lists.group_by("qid").aggregate([([], "count_all")])
    dup = lists.filter(pc.is_in(lists.column("qid"), value_set=n.filter(
        pc.greater(n.column("count_all"), 1)).column("qid")))
    seen: dict[str, tuple[int, int]] = {}
    for q, f, r in zip(*(dup.column(c).to_pylist() for c in ("qid", "file", "row")),
                       strict=True):
        if q in seen:
            return r, (f"{files[f]}: row {r} (qid={q}): qid also in {files[seen[q][0]]} row "
                       f"{seen[q][1]} (one candidate list per qid)")
        seen[q] = (f, r)
    raise AssertionError("count_distinct found a repeat")


def check_lists(t: pa.Table, f: str) -> None:
    """In candidate lists ``t`` (file ``f``): an empty qid, a qid on two rows, a null list,
    an empty or null pid, a pid twice in one list. The first bad row is a DataError naming
    the file, row and field."""
    qid, pids = t.column("qid"), t.column("pids")
    found: list[tuple[int, str]] = []  # the first row of each kind of defect

    def first(mask: Any, what: str, rows: Any = None) -> None:
        if pc.any(mask).as_py():
            i = pc.index(mask, True).as_py()
            row = i if rows is None else rows[i].as_py()
            found.append((row, f"{f}: row {row} (qid={qid[row].as_py()}): field 'pids' {what}"))

    bad = blank(qid)
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        found.append((i, f"{f}: row {i}: empty field 'qid'"))
    elif repeat := repeated_qid(_lists(t, 0), [f]):
        found.append(repeat)
    first(pc.is_null(pids), "is null")
    flat, parent = pc.list_flatten(pids), pc.list_parent_indices(pids)
    first(blank(flat), "holds an empty/null pid", parent)
    # a pid twice in a list: adjacent once sorted by (row, pid) (a group_by took 5x the memory)
    order = pc.sort_indices(pa.table({"row": parent, "pid": flat}),
                            sort_keys=[("row", "ascending"), ("pid", "ascending")])
    row, pid = parent.take(order), flat.take(order)
    first(pc.and_(pc.equal(row[1:], row[:-1]), pc.equal(pid[1:], pid[:-1])),
          "lists a pid twice", row)
    if found:
        raise DataError(min(found)[1])


def query_table(queries_uri: str | list[str]) -> pa.Table:
    """``{qid, lang, query}`` of one or several query tables (empty fields and a qid twice,
    in one table or across them, are errors: :func:`~qgscale.teacher.common.load_queries`)."""
    rows = load_queries(queries_uri)
    return pa.table({"qid": list(rows), "lang": [v[0] for v in rows.values()],
                     "query": [v[1] for v in rows.values()]})


@dataclass
class PairJob:
    """The join, as a shard job per corpus shard: the candidate pairs whose passage is in
    the shard, with the query and passage texts, sorted by pid (so a scoring unit's pairs of
    one passage are adjacent: :func:`qgscale.models.generator.score_pairs` encodes each
    passage once). Each corpus shard is read once. The pairs and queries come indexed
    (:class:`~qgscale.data.keyindex.KeyIndex`, built once on the driver), so a shard costs
    O(shard x log pairs + its pairs), not O(pairs); an actor holds them (O(queries x k), one
    copy per node in the object store) and one corpus shard, never the corpus."""

    pairs: Any  # ObjectRef of a KeyIndex of {qid, pid} by pid
    queries: Any  # ObjectRef of a KeyIndex of {qid, lang, query} by qid

    def setup(self, device: str, threads: int) -> tuple[KeyIndex, KeyIndex]:
        import ray

        pairs, queries = ray.get([self.pairs, self.queries])
        return pairs, queries

    def run(self, st: tuple[KeyIndex, KeyIndex], shard: Shard) -> tuple[pa.Table, dict]:
        """The shard's pairs, and the hash sum of the corpus rows it matched (``pid_sum``:
        :func:`pid_sum`)."""
        pairs, queries = st
        found = list(scan(shard.payload, pairs, ("pid", "title", "text")))
        if not found:
            return PAIRS.empty_table(), {"pid_sum": 0}
        t = pa.concat_tables(found)
        passages = pa.array([passage_text(a, b) for a, b in zip(
            t.column("title").to_pylist(), t.column("text").to_pylist(), strict=True)])
        at, pair = pairs.find(t.column("pid"))  # passage row, pair row
        qids = pairs.table.column("qid").take(pa.array(pair))
        i, q = queries.find(qids)  # every qid is known (checked by pair_job)
        at = pa.array(at[i])
        joined = pa.table({"qid": qids.take(pa.array(i)),
                           "lang": queries.table.column("lang").take(pa.array(q)),
                           "query": queries.table.column("query").take(pa.array(q)),
                           "pid": t.column("pid").take(at), "passage": passages.take(at)})
        return (joined.cast(PAIRS).sort_by([("pid", "ascending"), ("qid", "ascending")]),
                {"pid_sum": pid_sum(t.column("pid"))})


def pair_job(candidates_uri: str | list[str], queries_uri: str | list[str],
             first: Cut = None) -> tuple[PairJob, int, int]:
    """The join's job, its number of pairs and the :func:`pid_sum` of their distinct pids.
    The job holds the candidate pairs (:func:`candidate_pairs`) indexed by pid and the
    queries by qid, each put in the object store once; this process keeps no copy of its
    own. A candidate qid not in the queries is a DataError naming the candidate file and
    row."""
    import ray

    pairs = candidate_pairs(candidates_uri, first)
    queries = query_table(queries_uri)
    known = pc.is_in(pairs.column("qid"), value_set=queries.column("qid"))
    if not pc.all(known).as_py():
        i = pc.index(known, False).as_py()
        raise DataError(f"{pairs['file'][i]}: row {pairs['row'][i]}: qid={pairs['qid'][i]} "
                        f"not in queries {queries_uri}")
    pairs = pairs.select(["qid", "pid"])  # file and row: read again on an error only
    n, by_pid = pairs.num_rows, KeyIndex.build(pairs, "pid")
    expected = pid_sum(pc.unique(pairs.column("pid")))
    del pairs  # before the put: one copy here at a time
    by_qid = KeyIndex.build(queries, "qid")
    del queries
    return PairJob(ray.put(by_pid), ray.put(by_qid)), n, expected


PAIRS_DIR = "_pairs"  # under the scores folder: the joined work units


@dataclass
class PairSlice:
    uri: str  # pair shard file
    start: int  # row range [start, stop)
    stop: int


@dataclass
class ScoreJob:
    """The shard job: load the QG once per actor; per shard, read its pairs (texts
    included) and score them."""

    qg: QGSpec
    batch_tokens: int = 16384
    precision: str = "bf16"

    def setup(self, device: str, threads: int) -> Any:
        return self.qg.load(device, threads, self.precision, "teacher.score.precision")

    def run(self, qg: Any, shard: Shard) -> tuple[pa.Table, dict]:
        from concurrent.futures import ThreadPoolExecutor

        slices: tuple[PairSlice, ...] = shard.payload
        with ThreadPoolExecutor(min(16, len(slices))) as pool:  # their row groups only
            t = pa.concat_tables(list(pool.map(
                lambda sl: storage.read_rows(sl.uri, sl.start, sl.stop), slices)))
        cols = {c: t.column(c).to_pylist() for c in PAIRS.names}
        pairs = list(zip(cols["query"], cols["passage"], cols["lang"], strict=True))
        s = qg.score(pairs, batch_tokens=self.batch_tokens, precision=self.precision)
        score = s.mean.astype("float32")
        bad = np.flatnonzero(~np.isfinite(score))
        if bad.size:  # e.g. an fp16 overflow: never written, so never trained on
            i = int(bad[0])
            ends = np.cumsum([sl.stop - sl.start for sl in slices])
            k = int(np.searchsorted(ends, i, side="right"))
            sl = slices[k]
            raise DataError(f"{sl.uri}: row {sl.start + i - (ends[k - 1] if k else 0)} "
                            f"(qid={cols['qid'][i]}, pid={cols['pid'][i]}): teacher score is "
                            f"{score[i]} ({bad.size} non-finite of {len(score)} in this "
                            f"unit's pairs; teacher.score.precision={self.precision})")
        table = pa.table({"qid": cols["qid"], "pid": cols["pid"],
                          "score": score, "ntok": s.ntok.astype("int32")}, schema=SCORES)
        return table, {"slices": [[sl.uri, sl.start, sl.stop] for sl in slices]}


def join_pairs(candidates_uri: str | list[str], queries_uri: str | list[str],
               corpus_uri: str, out_uri: str, config_hash: str, sc: ScoreConfig,
               first: Cut = None, *, ray_from: int | None = None,
               num_partitions: int = 64) -> dict:
    """Write the scoring work units: pair shards ``{qid, lang, query, pid, passage}`` under
    ``out_uri`` of each list's first ``first`` candidates (all without it); returns their
    manifest. A finished join (its manifest, with ``config_hash``) is reused.

    Below ``ray_from`` candidate lists (None: any number) the pairs are indexed here and
    joined on actors, one corpus shard a unit (:class:`PairJob`, resumable shard by shard);
    from it on by Ray Data workers (:mod:`qgscale.teacher.pairs_dataset`, ``num_partitions``
    hash partitions), so that no process holds every pair.
    A candidate whose qid is not in the queries, or whose pid is not in the corpus, is a
    DataError naming the candidate file, row and id."""
    done = storage.read_manifest(out_uri)
    if (done and done.get("config_hash") == config_hash and done["rows"] == done.get("pairs")
            and storage.fingerprint(out_uri) is not None):  # every listed shard is there
        return done
    if ray_from is not None and candidate_lists(candidates_uri) >= ray_from:
        from qgscale.teacher.pairs_dataset import join_pairs_dataset

        return join_pairs_dataset(candidates_uri, queries_uri, corpus_uri, out_uri,
                                  config_hash, first=first, num_partitions=num_partitions)
    job, n_pairs, expected = pair_job(candidates_uri, queries_uri, first)
    units = [Shard(f"part-{i:05d}", 1, uri) for i, uri in enumerate(corpus_shards(corpus_uri))]
    stats = run_shards(job, units, out_uri, config_hash,
                       sc.model_copy(update={"gpus_per_actor": 0}), stage="teacher.score",
                       desc="join pairs", unit="corpus shard")
    writer = storage.ShardWriter(out_uri, config_hash)
    markers = writer.markers()
    rows = sum(markers[u.name]["rows"] for u in units)
    # every candidate pid found on exactly one corpus row (markers of an older version
    # have no sum: their count alone is checked)
    sums = [markers[u.name].get("pid_sum") for u in units]
    found = sum(sums) % (1 << 64) if None not in sums else expected
    if rows != n_pairs or found != expected:  # checked before the manifest
        _name_missing_or_twice(candidates_uri, first, [writer.shard_uri(u.name) for u in units],
                               corpus_uri)
        raise RuntimeError(f"{out_uri}: the joined pairs ({rows}) are not the candidate "
                           f"pairs ({n_pairs}) and no pid is to blame (shards of another "
                           "corpus under the same key?): remove the folder and rerun")
    return writer.finalize([u.name for u in units], markers, pairs=n_pairs, run=stats)


def _name_missing_or_twice(candidates_uri: str | list[str], first: Cut,
                           shards: list[str], corpus_uri: str) -> None:
    """The DataError of joined pairs (``shards``) that are not the candidate pairs: the first
    candidate (in file order) whose pid is not in the corpus, else a pid on two corpus
    rows."""
    pairs = candidate_pairs(candidates_uri, first)  # with their file and row
    got = pa.concat_tables([storage.read_parquet(f, ["qid", "pid"]) for f in shards])
    missing = pc.invert(pc.is_in(pairs.column("pid"), value_set=got.column("pid")))
    if pc.any(missing).as_py():
        i = pc.index(missing, True).as_py()
        raise DataError(f"{pairs['file'][i]}: row {pairs['row'][i]} "
                        f"(qid={pairs['qid'][i]}): pid={pairs['pid'][i]} not in corpus "
                        f"{corpus_uri}")
    n = got.group_by(["qid", "pid"]).aggregate([([], "count_all")])
    twice = n.filter(pc.greater(n.column("count_all"), 1)).slice(0, 1).to_pylist()
    if not twice:
        return
    dup = twice[0]
    raise DataError(f"{corpus_uri}: pid={dup['pid']} (a candidate of qid={dup['qid']}) "
                    f"is on {dup['count_all']} corpus rows: a pid names one passage")


def plan_units(pairs_manifest: dict, pairs_uri: str, unit_pairs: int) -> list[Shard]:
    """Scoring units of ``unit_pairs`` pairs (the last one fewer): consecutive row ranges of
    the pair shards, a unit spanning shards where they are small (one pair shard per
    corpus shard: at 10k corpus shards and 120k pairs, 12 pairs each)."""
    units: list[Shard] = []
    held: list[PairSlice] = []
    size = 0
    for sh in pairs_manifest["shards"]:
        uri, start = storage.join(pairs_uri, sh["file"]), 0
        while start < sh["rows"]:
            stop = min(sh["rows"], start + unit_pairs - size)
            held.append(PairSlice(uri, start, stop))
            size += stop - start
            start = stop
            if size == unit_pairs:
                units.append(Shard(storage.shard_name(len(units)), size, tuple(held)))
                held, size = [], 0
    if held:
        units.append(Shard(storage.shard_name(len(units)), size, tuple(held)))
    return units


def generated_candidates(candidates_uri: str, queries_uri: str, qrels_uri: str,
                         generated_uri: str, out_uri: str, first: int | None = None
                         ) -> tuple[str, str]:
    """Inputs to score the QG-generated queries too (KD on generated queries).

    A generated query g (language l) from passage p gets qid ``generated_qid(p, l, g)`` and, as
    candidate list, the union of C(q) (its first ``first``) over the training queries q with
    positive p and language != l (the lists the student pairs it with). Writes
    ``out_uri/{candidates, queries}/part-00000.parquet``; returns their URIs. Holds every
    candidate list: from ``data.ray_rows_from`` lists on, the score stage builds the same
    with Ray Data (:func:`~qgscale.teacher.pairs_dataset.generated_candidates_dataset`).
    """
    from qgscale.data.schema import CANDIDATES, QUERIES
    from qgscale.train.data import generated_qid

    lang = {q: v[0] for q, v in load_queries(queries_uri).items()}
    cands = {}
    for f in _files(candidates_uri):
        t = storage.read_parquet(f, ["qid", "pids"])
        cands.update((q, p[:first] if first and p else p) for q, p in zip(
            t["qid"].to_pylist(), t["pids"].to_pylist(), strict=True))
    by_pid: dict[str, list[str]] = {}
    for r in read_table_rows(qrels_uri, "qrels"):
        if (r["rel"] or 0) > 0 and r["qid"] in cands:
            by_pid.setdefault(r["pid"], []).append(r["qid"])
    listed: dict[str, tuple[str, str, list[str]]] = {}  # gid -> (lang, query, its list)
    for pid, glang, query in generated_of(generated_uri, by_pid):  # only positives' queries
        pids = dict.fromkeys(p for q in by_pid[pid] if lang.get(q) != glang for p in cands[q])
        if pids:  # a query with no list is neither scored nor trained on
            listed[generated_qid(pid, glang, query)] = (glang, query, list(pids))
    q_uri, c_uri = storage.join(out_uri, "queries"), storage.join(out_uri, "candidates")
    storage.remove(out_uri, recursive=True)  # never mixed with an earlier build's files
    storage.write_parquet(storage.join(q_uri, "part-00000.parquet"), pa.Table.from_pylist(
        [{"qid": g, "lang": lt, "text": t} for g, (lt, t, _) in listed.items()],
        schema=QUERIES))
    storage.write_parquet(storage.join(c_uri, "part-00000.parquet"), pa.Table.from_pylist(
        [{"qid": g, "pids": p, "scores": None} for g, (_, _, p) in listed.items()],
        schema=CANDIDATES))
    return c_uri, q_uri


def read_table_rows(uri: str, what: str) -> list[dict[str, Any]]:
    from qgscale.teacher.common import read_table

    return read_table(uri, what).to_pylist()


def score_candidates(qg: QGSpec, candidates_uri: str | list[str],
                     queries_uri: str | list[str], corpus_uri: str, out_uri: str,
                     config_hash: str, sc: ScoreConfig | None = None,
                     first: Cut = None, *, ray_from: int | None = None,
                     num_partitions: int = 64) -> dict[str, Any]:
    """Plain API: score every candidate pair (or the first ``first`` of each list, one cut
    for every candidate set or one per set: :func:`file_cuts`) into
    ``out_uri`` (settings ``sc``, the ``teacher.score`` section; defaults if None); returns
    the manifest. ``ray_from``, ``num_partitions``: where the join moves to Ray Data
    (:func:`join_pairs`).

    Skips every shard with a done marker of the same ``config_hash`` (resume). Needs a
    running Ray (or starts a local one); actors as :func:`qgscale.runtime.run_shards`.
    Several candidate sets (with their queries) may be given as lists.
    """
    sc = sc or ScoreConfig()
    connect()
    inputs = {"candidates": candidates_uri, "queries": queries_uri, "corpus": corpus_uri}
    pairs_uri = storage.join(out_uri, PAIRS_DIR)
    joined = join_pairs(candidates_uri, queries_uri, corpus_uri, pairs_uri, config_hash, sc,
                        first, ray_from=ray_from, num_partitions=num_partitions)
    rows = planned_unit_rows(out_uri, config_hash, joined["rows"], sc.shard_pairs, sc,
                             "teacher.score")  # sized to the actor pool, kept on resume
    units = plan_units(joined, pairs_uri, rows)
    job = ScoreJob(qg, sc.batch_tokens, sc.precision)
    stats = run_shards(job, units, out_uri, config_hash, sc, stage="teacher.score",
                       desc="teacher score", unit="pair")
    planned = {f"{u.name}.parquet" for u in units}
    for f in storage.list_files(out_uri, ".parquet"):  # e.g. units of an older plan: the
        if posixpath.basename(f) not in planned:      # readers read every shard here
            storage.remove(f)
    pairs = sum(u.size for u in units)
    manifest = storage.ShardWriter(out_uri, config_hash).finalize(
        [u.name for u in units], stage="teacher-score", inputs=inputs, pairs=pairs,
        first_candidates=first, run=stats)
    if manifest["rows"] != pairs:
        raise RuntimeError(f"{out_uri}: {manifest['rows']} scored rows for {pairs} pairs")
    return manifest


def run_score(cfg: Any, model: Any, *, candidates_uri: str, queries_uri: str, corpus_uri: str,
              out_uri: str, key: str, generated_uri: str | None = None,
              qrels_uri: str | None = None, pairs_uri: str | None = None) -> dict[str, Any]:
    """Stage function ``teacher score`` (``cfg.teacher.score``): the pairs of
    ``candidates_uri`` that distillation reads (each list's first ``distill.loss.
    n_candidates``; ``mine.top_k`` may keep more) scored by the QG ``model`` (a
    ``ModelConfig``) into ``out_uri``.

    With ``generated_uri`` (``distill.loss.kd_on_generated``) the generated queries are scored
    as well, on the candidate lists of :func:`generated_candidates` (from ``data.ray_rows_from``
    lists on, :func:`~qgscale.teacher.pairs_dataset.generated_candidates_dataset`; written to
    ``pairs_uri``, using the positives of ``qrels_uri``), into the same output.
    """
    sc, first = cfg.teacher.score, cfg.distill.loss.n_candidates
    connect(cfg.ray)
    cands, queries = [candidates_uri], [queries_uri]
    if generated_uri:
        if not storage.exists(storage.join(generated_uri, storage.MANIFEST)):
            raise MissingInputError(f"{generated_uri}: no generated queries; with distill.loss."
                                    "kd_on_generated run `qgscale teacher generate` first")
        if not (qrels_uri and pairs_uri):
            raise ValueError("scoring generated queries needs qrels_uri and pairs_uri")
        if candidate_lists(cands[0]) >= cfg.data.ray_rows_from:  # no lists held here
            from qgscale.teacher.pairs_dataset import generated_candidates_dataset

            c, q = generated_candidates_dataset(cands[0], queries[0], qrels_uri, generated_uri,
                                                pairs_uri, first,
                                                num_partitions=cfg.data.ray_rows_partitions)
        else:
            c, q = generated_candidates(cands[0], queries[0], qrels_uri, generated_uri,
                                        pairs_uri, first)
        cands.append(c)
        queries.append(q)
    return score_candidates(  # the generated lists are unions of first-n lists: scored whole
        qg_spec(cfg, model), cands if len(cands) > 1 else cands[0],
        queries if len(queries) > 1 else queries[0], corpus_uri, out_uri, key, sc,
        [first, None] if len(cands) > 1 else first,
        ray_from=cfg.data.ray_rows_from, num_partitions=cfg.data.ray_rows_partitions)
