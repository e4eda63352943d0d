"""Candidate and hard-negative mining: top-k retrieval for training queries, positives dropped.

Outputs under ``out_uri``:
``candidates/`` CANDIDATES ``{qid, pids, scores}`` (top-k, positives removed; the teacher
scores these) and ``train/`` TRAIN_EXAMPLES ``{qid, pos_pids, neg_pids}`` (hard negatives =
candidates ranked ``skip_top .. skip_top + n_negatives``; queries without a positive get
candidates but no training example, and are counted in the manifest); work files: each
query's ranked list (``_ranked/``) and the answer check's pairs (``_answer_hits/``).

For answer-supervised data (XOR-TyDi, MKQA: positives made by answer match, the ``bm25``
stage) an :class:`AnswerFilter` keeps retrieved passages that contain one of the query's
answers out of the hard negatives: the dense index finds answer passages beyond BM25's top-k
(and ``bm25.n_positives`` keeps only the first few), and training would push them away as
negatives. They stay among the candidates, which the teacher scores. The check reads the
corpus once, a corpus shard per actor job, after every query is retrieved.

The driver reads the queries a shard at a time (:class:`Queries`) and holds the positives and
answers in Arrow columns looked up by qid hash (:class:`Positives`, :class:`AnswerFilter`),
never the query table. A shard's queries are encoded while the shard before it is searched.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qgscale import storage
from qgscale.config import BM25Config
from qgscale.data.corpus import corpus_shards, scan
from qgscale.data.keyindex import KeyIndex
from qgscale.data.pidfilter import key_hashes, pid_sum
from qgscale.data.schema import ANSWERS, CANDIDATES, QRELS, TRAIN_EXAMPLES, blank, passage_text
from qgscale.errors import DataError
from qgscale.retrieval.answers import check_answer_qids
from qgscale.runtime import Shard, bundles, map_shards, requesting, run_shards

RANKED_DIR = "_ranked"  # under the mine folder: each query's retrieved list, positives dropped
ANSWERS_DIR = "_answer_hits"  # the answer check's (qid, pid) pairs, a shard per corpus shard
HITS = pa.schema([("qid", pa.string()), ("pid", pa.string())])


@dataclass(frozen=True)
class Positives:
    """The positive pids (rel > 0) of QRELS shards by qid, held in Arrow columns (about 40
    bytes a distinct (qid, pid) pair, with its qid's hash), looked up a query shard at a
    time."""

    index: KeyIndex  # distinct positive (qid, pid) pairs, by qid
    most: int  # the most positives of one query

    @classmethod
    def read(cls, qrels_uri: str) -> Positives:
        """The positives of ``qrels_uri`` (a file or a folder of shards), read file by file
        (only the positive rows are kept); a missing field, or an empty qid or pid on a
        positive row, is a DataError naming file and row."""
        parts = []
        for f in storage.parquet_files(qrels_uri):
            t = storage.read_parquet(f)
            missing = [c for c in QRELS.names if c not in t.column_names]
            if missing:
                raise DataError(f"{f}: qrels lack field(s) {missing}")
            pos = pc.fill_null(pc.greater(t.column("rel"), 0), False)
            for field in ("qid", "pid"):
                bad = pc.and_(pos, blank(t.column(field)))
                if pc.any(bad).as_py():
                    i = pc.index(bad, True).as_py()
                    raise DataError(f"{f}: row {i}: empty field {field!r} of a positive")
            parts.append(t.filter(pos).select(["qid", "pid"]))
        pairs = pa.concat_tables(parts, promote_options="permissive")
        q, p = pairs.column("qid"), pairs.column("pid")
        hq, hp = key_hashes(q), key_hashes(p)
        order = np.lexsort((hp, hq))  # by qid hash, then pid hash: a pair twice is adjacent
        hq, hp = hq[order], hp[order]
        dup = np.flatnonzero((hq[1:] == hq[:-1]) & (hp[1:] == hp[:-1])) + 1
        if len(dup):  # the same hashes: the same pair unless the strings differ
            a, b = pa.array(order[dup]), pa.array(order[dup - 1])
            same = pc.and_(pc.equal(q.take(a), q.take(b)), pc.equal(p.take(a), p.take(b)))
            dup = dup[same.to_numpy(zero_copy_only=False)]
        keep = np.ones(len(order), dtype=bool)
        keep[dup] = False
        hq = hq[keep]
        runs = np.diff(np.flatnonzero(np.r_[True, hq[1:] != hq[:-1], True]))  # per qid
        return cls(KeyIndex(pairs.take(pa.array(order[keep])), "qid", hq),
                   int(runs.max()) if len(hq) else 0)

    def of(self, qids: Sequence[str]) -> list[list[str]]:
        """Each query's positive pids, sorted (none for a query without)."""
        return [sorted(set(p)) for p in self.index.values(pa.array(qids, pa.string()), "pid")]


@dataclass
class AnswerJob:
    """The answer check as a shard job per corpus shard: the (qid, pid) pairs whose passage
    contains one of the query's answers. The pairs (by pid) and the answers (by qid) come
    indexed from the driver, put in the object store once; an actor holds them and one
    corpus shard."""

    pairs: Any  # ObjectRef of a KeyIndex of {qid, pid} by pid
    answers: Any  # ObjectRef of a KeyIndex of ANSWERS rows by qid
    match: str = "dpr"

    def setup(self, device: str, threads: int) -> tuple[KeyIndex, KeyIndex]:
        import ray

        pairs, answers = ray.get([self.pairs, self.answers])
        return pairs, answers

    def run(self, st: tuple[KeyIndex, KeyIndex], shard: Shard) -> tuple[pa.Table, dict]:
        """The shard's answer pairs, and the :func:`pid_sum` of the corpus rows it matched."""
        from qgscale.retrieval.answers import pair_hits

        pairs, answers = st
        hits = [HITS.empty_table()]
        found = []
        for t in scan(shard.payload, pairs, ("pid", "title", "text")):
            found.append(t.column("pid"))
            bodies = [passage_text(a, b) for a, b in zip(
                t.column("title").to_pylist(), t.column("text").to_pylist(), strict=True)]
            at, pair = pairs.find(t.column("pid"))  # corpus row, pair row
            qids = pairs.table.column("qid").take(pa.array(pair))
            distinct = pc.unique(qids)
            given = {q: [x for row in rows for x in row or ()] for q, rows in zip(
                distinct.to_pylist(), answers.values(distinct, "answers"), strict=True)}
            hit = pair_hits(bodies, at.tolist(), qids.to_pylist(), given, self.match)
            hits.append(pa.table({"qid": qids.filter(pa.array(hit)),
                                  "pid": t.column("pid").take(pa.array(at[hit]))}, schema=HITS))
        sums = pid_sum(pa.chunked_array([c for f in found for c in f.chunks], pa.string()))
        return pa.concat_tables(hits), {"pid_sum": sums}


@dataclass(frozen=True)
class AnswerFilter:
    """The retrieved passages that contain one of their query's answers (DPR's match on
    "title text", ``qgscale.retrieval.answers``): not hard negatives. ``answers``: ANSWERS
    rows by qid (:meth:`read`); ``actors``: the check's actor pool (``cfg.bm25``)."""

    answers: KeyIndex
    corpus_uri: str
    match: str = "dpr"
    actors: Any = None

    @classmethod
    def read(cls, answers_uri: str, corpus_uri: str, match: str = "dpr", actors: Any = None
             ) -> AnswerFilter:
        """The filter of a prepared split's ``answers`` table, held in Arrow columns (a qid on
        two rows is a DataError)."""
        table = storage.read_parquet(answers_uri)
        missing = [c for c in ANSWERS.names if c not in table.column_names]
        if missing:
            raise DataError(f"{answers_uri}: missing field(s) {missing}")
        check_answer_qids(table.column("qid"), answers_uri)
        table = table.select(ANSWERS.names)  # a query without answers is never checked
        has = pc.fill_null(pc.greater(pc.list_value_length(table.column("answers")), 0), False)
        return cls(KeyIndex.build(table.filter(has), "qid"), corpus_uri, match, actors)

    def hits(self, ranked_uris: Sequence[str], positives: Positives | None, work_uri: str,
             key: str = "", skip_top: int = 0, top: int | None = None) -> KeyIndex:
        """The (qid, pid) pairs (by qid) of the ranked lists (:func:`ranked_lists` shards, or
        any ``{qid, pids}`` rows; from rank ``skip_top`` on: the ones that can be negatives;
        before rank ``top`` when given) of the queries with answers (and with ``positives``
        unless None) whose passage contains an answer: one pass over the corpus, a
        shard job per corpus shard on Ray actors (:class:`AnswerJob`, its outputs under
        ``work_uri``, resumable with ``key``: give one that changes with the lists). The
        driver holds those pairs in Arrow (O(queries with answers x k), as the teacher's
        pair join). A listed pid the corpus lacks, or has twice, is a DataError."""
        import ray

        parts = [HITS.empty_table()]
        for uri in ranked_uris:
            t = storage.read_parquet(uri, ["qid", "pids"])
            q = t.column("qid")
            keep = self.answers.contains(q)
            if positives is not None:
                keep &= positives.index.contains(q)
            t = t.filter(pa.array(keep))
            lists = pc.list_slice(t.column("pids"), skip_top, top)
            parts.append(pa.table({"qid": t.column("qid").take(pc.list_parent_indices(lists)),
                                   "pid": pc.list_flatten(lists)}, schema=HITS))
        pairs = pa.concat_tables(parts)
        if not pairs.num_rows:
            return KeyIndex.build(pairs, "qid")
        needed = pc.unique(pairs.column("pid"))
        expected = pid_sum(needed)
        job = AnswerJob(ray.put(KeyIndex.build(pairs, "pid")), ray.put(self.answers),
                        self.match)
        del pairs
        units = [Shard(f"part-{i:05d}", 1, uri)
                 for i, uri in enumerate(corpus_shards(self.corpus_uri))]
        actors = self.actors or BM25Config()
        run_shards(job, units, work_uri, key, actors.model_copy(update={"gpus_per_actor": 0}),
                   stage="bm25", desc="answer check", unit="corpus shard")
        writer = storage.ShardWriter(work_uri, key)
        markers = writer.markers()
        if sum(markers[u.name]["pid_sum"] for u in units) % (1 << 64) != expected:
            self._name_lost(needed, work_uri)
        return KeyIndex.build(pa.concat_tables([HITS.empty_table(), *map_shards(
            storage.read_parquet, [writer.shard_uri(u.name) for u in units])]), "qid")

    def _name_lost(self, needed: pa.Array, work_uri: str) -> None:
        """The DataError of retrieved pids the corpus lacks, or has on two rows."""
        found = pa.concat_tables([HITS.empty_table().select(["pid"]),
                                  *scan(self.corpus_uri, needed, ("pid",))])
        lost = pc.filter(needed, pc.invert(pc.is_in(needed, value_set=found.column("pid"))))
        if len(lost):
            raise DataError(f"{self.corpus_uri}: {len(lost)} retrieved pid(s) not in the corpus "
                            f"the answers are matched on (e.g. {sorted(lost.to_pylist())[:3]}): "
                            "the index was built from another corpus")
        n = found.group_by("pid").aggregate([([], "count_all")])
        twice = n.filter(pc.greater(n.column("count_all"), 1)).column("pid")
        if len(twice):
            raise DataError(f"{self.corpus_uri}: pid={twice[0]} is on several corpus rows: a "
                            "pid names one passage")
        raise RuntimeError(f"{work_uri}: the answer check's shards do not match the corpus "
                           f"{self.corpus_uri} (its shards changed under the same key?): "
                           "remove that folder and rerun")


def _lists(values: pa.Array, counts: np.ndarray) -> pa.ListArray:
    """``values`` cut into consecutive lists of ``counts`` values."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _found(probe: pa.Table, known: pa.Table) -> np.ndarray:
    """Whether each row of ``probe`` is a row of ``known`` (the same columns): exact, by
    Arrow's hash semi-join (a null matches nothing)."""
    hit = np.zeros(probe.num_rows, dtype=bool)
    if probe.num_rows and known.num_rows:
        i = pa.array(np.arange(probe.num_rows))
        found = probe.append_column("_i", i).join(known, keys=known.column_names,
                                                   join_type="left semi")
        hit[found.column("_i").to_numpy()] = True
    return hit


def ranked_lists(qids: Sequence[str], pids: np.ndarray, scores: np.ndarray,
                 positives: Sequence[Sequence[str]]) -> pa.Table:
    """Each query's retrieved ``(pids, scores)`` (rows of equal length) in rank order, its
    positives and missing hits (None) dropped (:data:`CANDIDATES` rows)."""
    if len(positives) != len(qids):
        raise ValueError(f"{len(qids)} queries, {len(positives)} lists of positives")
    if not len(qids):
        return CANDIDATES.empty_table()
    p = np.asarray(pids, dtype=object)
    row = np.repeat(np.arange(len(p)), p.shape[1])
    flat = pa.array(p.ravel(), pa.string())  # None: null, dropped
    known = pa.table({"row": np.repeat(np.arange(len(p)), [len(x) for x in positives]),
                      "pid": pa.array([x for xs in positives for x in xs], pa.string())})
    keep = flat.is_valid().to_numpy(zero_copy_only=False) & ~_found(
        pa.table({"row": row, "pid": flat}), known)
    counts = np.bincount(row[keep], minlength=len(p))
    return pa.table({"qid": pa.array(qids, pa.string()),
                     "pids": _lists(flat.filter(pa.array(keep)), counts),
                     "scores": _lists(pa.array(np.asarray(scores, np.float32).ravel()[keep]),
                                      counts)},
                    schema=CANDIDATES)


def select(ranked: pa.Table, positives: Sequence[Sequence[str]], top_k: int,
           n_negatives: int, skip_top: int = 0,
           answer_hits: set[tuple[str, str]] = frozenset()
           ) -> tuple[pa.Table, pa.Table, int, int]:
    """Ranked lists (:func:`ranked_lists`) and each query's positives -> (CANDIDATES,
    TRAIN_EXAMPLES, #queries without positive, #answer passages kept out of the negatives).

    Candidates are the first ``top_k`` of a list, negatives the first ``n_negatives`` after
    the first ``skip_top`` that are not in ``answer_hits`` (:meth:`AnswerFilter.hits`); an
    answer passage counts as dropped when it comes before the window is full. Arrow and numpy
    over the whole shard, no loop over candidates.
    """
    ranked = ranked.combine_chunks()
    qid, pids, scores = (ranked.column(c).chunk(0) if ranked.num_rows else
                         pa.array([], CANDIDATES.field(c).type) for c in CANDIDATES.names)
    cand = pa.table({"qid": qid, "pids": pc.list_slice(pids, 0, top_k),
                     "scores": pc.list_slice(scores, 0, top_k)}).cast(CANDIDATES)
    has = np.array([bool(p) for p in positives], dtype=bool)
    window = pc.list_slice(pids.filter(pa.array(has)), skip_top)
    qids = qid.filter(pa.array(has))
    flat = pc.list_flatten(window)
    row = pc.list_parent_indices(window).to_numpy(zero_copy_only=False)
    hit = _found(pa.table({"qid": qids.take(pa.array(row)), "pid": flat}),
                 pa.table({"qid": [q for q, _ in answer_hits], "pid": [p for _, p in answer_hits]},
                          schema=HITS))
    # the non-answer passages before each one in its list: it is looked at while < n
    before = np.cumsum(~hit) - ~hit
    starts = np.searchsorted(row, np.arange(len(qids)))
    before -= before[starts[row]] if len(row) else 0
    seen = before < n_negatives
    keep = seen & ~hit
    train = pa.table({"qid": qids,
                      "pos_pids": pa.array([sorted(set(p)) for p in positives if p],
                                           pa.list_(pa.string())),
                      "neg_pids": _lists(flat.filter(pa.array(keep)),
                                         np.bincount(row[keep], minlength=len(qids)))},
                     schema=TRAIN_EXAMPLES)
    return cand, train, int((~has).sum()), int((seen & hit).sum())


@dataclass(frozen=True)
class Queries:
    """The queries of parquet shards, read by global row range (each shard's footer once,
    then only the rows asked for), so that no process holds the query table."""

    files: list[str]
    counts: list[int]  # rows per file

    @classmethod
    def open(cls, queries_uri: str) -> Queries:
        """The queries of ``queries_uri`` (a file or a folder of shards); a shard without a
        ``qid`` or ``text`` field is a DataError naming it."""
        files = storage.parquet_files(queries_uri)
        metas = storage.footers(files)
        for f, m in zip(files, metas, strict=True):
            missing = [c for c in ("qid", "text") if c not in m.schema.to_arrow_schema().names]
            if missing:
                raise DataError(f"{f}: queries lack field(s) {missing}")
        return cls(files, [m.num_rows for m in metas])

    def __len__(self) -> int:
        return sum(self.counts)

    def read(self, rows: slice) -> tuple[list[str], list[str]]:
        """The (qids, texts) of global rows ``rows``; an empty qid or text is a DataError
        naming file and row."""
        qids: list[str] = []
        texts: list[str] = []
        at = 0
        for f, n in zip(self.files, self.counts, strict=True):
            lo, hi = max(rows.start - at, 0), min(rows.stop - at, n)
            at += n
            if lo >= hi:
                continue
            t = storage.read_rows(f, lo, hi, ["qid", "text"])
            for field in ("qid", "text"):
                bad = blank(t.column(field))
                if pc.any(bad).as_py():
                    i = pc.index(bad, True).as_py()
                    raise DataError(f"{f}: row {lo + i}: empty field {field!r}")
            qids += t.column("qid").to_pylist()
            texts += t.column("text").to_pylist()
        return qids, texts


def retrieve(queries: Queries, positives: Positives, encode: Callable, out_uri: str,
             search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], *,
             top_k: int = 30, n_negatives: int = 8, skip_top: int = 0,
             shard_rows: int = 5000, config_hash: str = "") -> dict:
    """Each query shard's ranked lists (``out_uri/_ranked``, :func:`ranked_lists` of the top
    ``max(top_k, skip_top + n_negatives)`` + the most positives of a query, so that as many
    are left once positives are dropped), a shard of ``shard_rows`` queries read, encoded
    (``encode(texts) -> float32 matrix``) and searched (``search_fn(vectors, k) -> (pids,
    scores)``) at a time, resumable shard by shard; returns their manifest. The next shard
    to do is read and encoded in a thread while this one is searched (on a cluster: the
    encoder actor and the search actors work at once), so ``encode`` and ``search_fn`` run
    concurrently, each called by one thread."""
    k = max(top_k, skip_top + n_negatives) + positives.most
    writer = storage.ShardWriter(storage.join(out_uri, RANKED_DIR), config_hash)
    done = writer.markers()
    todo = [rows for name, rows in storage.shard_slices(len(queries), shard_rows)
            if name not in done]
    after = {a.start: b for a, b in zip(todo[:-1], todo[1:], strict=True)}  # the next to do

    def encoded(rows: slice) -> tuple[list[str], np.ndarray | None]:
        batch, texts = queries.read(rows)
        return batch, encode(texts) if batch else None  # no queries: nothing to encode

    pool = ThreadPoolExecutor(1, thread_name_prefix="mine-encode")
    ahead: dict[int, Future] = {}

    def shard(name: str, rows: slice) -> pa.Table:
        batch, vectors = (ahead.pop(rows.start, None) or pool.submit(encoded, rows)).result()
        if rows.start in after:  # encoded while this one is searched
            ahead[after[rows.start].start] = pool.submit(encoded, after[rows.start])
        pids, scores = search_fn(vectors, k) if batch else ([], [])
        return ranked_lists(batch, pids, scores, positives.of(batch))

    try:
        return writer.write_shards(len(queries), shard_rows, shard, desc="mine", done=done)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an error: not waiting for an encode


def examples(ranked: dict, positives: Positives, out_uri: str, *, top_k: int = 30,
             n_negatives: int = 8, skip_top: int = 0, config_hash: str = "",
             answers: AnswerFilter | None = None) -> dict:
    """The candidates and training examples of every ranked list shard (``ranked``: their
    manifest, :func:`retrieve`) by :func:`select`, resumable shard by shard (a shard is done
    when both its outputs are); with ``answers``, the answer check
    (:meth:`AnswerFilter.hits`) of the shards left to do first. Writes and returns the
    stage's manifest."""
    cand_w = storage.ShardWriter(storage.join(out_uri, "candidates"), config_hash)
    train_w = storage.ShardWriter(storage.join(out_uri, "train"), config_hash)
    names = [s["name"] for s in ranked["shards"]]
    done_c, done_t = cand_w.markers(), train_w.markers()
    todo = [s for s in ranked["shards"] if s["name"] not in done_c or s["name"] not in done_t]
    uris = [storage.join(out_uri, RANKED_DIR, s["file"]) for s in todo]
    # the answer pairs follow from those lists: keyed by their contents
    lists = hashlib.sha256("".join(s["sha256"] for s in todo).encode()).hexdigest()[:16]
    hits = (answers.hits(uris, positives, storage.join(out_uri, ANSWERS_DIR),
                         f"{config_hash}/{lists}/{skip_top}/{answers.match}", skip_top)
            if answers and todo else None)
    for s, uri in zip(todo, uris, strict=True):
        name = s["name"]
        ranked_rows = storage.read_parquet(uri)
        qids = ranked_rows.column("qid")
        found = set() if hits is None else {
            (q, p) for q, ps in zip(qids.to_pylist(), hits.values(qids, "pid"), strict=True)
            for p in ps}
        cand, train, n, dropped = select(ranked_rows, positives.of(qids.to_pylist()), top_k,
                                         n_negatives, skip_top, found)
        # the training examples first: a done candidates shard means both are done
        train_w.write(name, train, no_positive=n, answer_negatives_dropped=dropped)
        cand_w.write(name, cand)
    m_cand = cand_w.finalize(names)
    done = train_w.markers()
    marks = [done.get(name, {}) for name in names]  # finalize names a missing one
    no_pos = sum(m.get("no_positive", 0) for m in marks)
    dropped = sum(m.get("answer_negatives_dropped", 0) for m in marks)
    m_train = train_w.finalize(names, done, no_positive=no_pos,
                               answer_negatives_dropped=dropped)
    return storage.write_manifest(out_uri, config_hash, queries=m_cand["rows"],
                                  candidates=m_cand["rows"], train_examples=m_train["rows"],
                                  no_positive=no_pos, answer_negatives_dropped=dropped,
                                  answer_filter=answers is not None)


def mine(queries_uri: str, positives: Positives, encode: Callable, out_uri: str,
         search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], *,
         top_k: int = 30, n_negatives: int = 8, skip_top: int = 0, shard_rows: int = 5000,
         config_hash: str = "", answers: AnswerFilter | None = None) -> dict:
    """Mine the queries of ``queries_uri``: their ranked lists (:func:`retrieve`), then their
    candidates and training examples (:func:`examples`; ``answers``: keep answer passages
    out of the negatives). The driver holds the positives in columns and two query shards in
    Python (one searched, the next encoded), never the query table. Returns the manifest."""
    ranked = retrieve(Queries.open(queries_uri), positives, encode, out_uri, search_fn,
                      top_k=top_k, n_negatives=n_negatives, skip_top=skip_top,
                      shard_rows=shard_rows, config_hash=config_hash)
    return examples(ranked, positives, out_uri, top_k=top_k, n_negatives=n_negatives,
                    skip_top=skip_top, config_hash=config_hash, answers=answers)


def run_mine(cfg: Any, model_uri: str, index_uri: str, queries_uri: str, qrels_uri: str,
             out_uri: str, key: str, answers: AnswerFilter | None = None) -> dict:
    """Stage function ``index mine``: encode the queries with ``model_uri``, search
    ``index_uri``, write ``out_uri/{candidates,train}`` (``cfg.mine``, ``cfg.index.search``;
    ``answers``: see :class:`AnswerFilter`, checked once the encoder and search actors are
    gone, so that its actors get their CPUs)."""
    import ray

    from qgscale.index.encode import QueryEncoder, load_dual_encoder
    from qgscale.index.search import ShardedSearcher, search_resources

    mc, ic = cfg.mine, cfg.index.search
    positives = Positives.read(qrels_uri)
    shards, coder = search_resources(index_uri, ic)
    with requesting("index.search", bundles(shards) + bundles(coder)):
        actor = ray.remote(QueryEncoder).options(**coder.options()).remote(
            functools.partial(load_dual_encoder, model_uri, "cpu"), ic.batch_size, ic.precision,
            coder.num_gpus, coder.threads)
        searcher = None
        try:
            searcher = ShardedSearcher(index_uri, ic.nprobe, ic.ef_search, shards.num_cpus,
                                       ic.refine, ic.k_factor, num_gpus=shards.num_gpus,
                                       gpus_explicit=bool(ic.gpus_per_actor))
            ranked = retrieve(Queries.open(queries_uri), positives,
                              lambda texts: ray.get(actor.encode_queries.remote(texts)),
                              out_uri, searcher.search, top_k=mc.top_k,
                              n_negatives=mc.n_negatives, skip_top=mc.skip_top,
                              shard_rows=mc.shard_rows, config_hash=key)
        finally:
            ray.kill(actor)
            if searcher is not None:
                searcher.close()
    return examples(ranked, positives, out_uri, top_k=mc.top_k, n_negatives=mc.n_negatives,
                    skip_top=mc.skip_top, config_hash=key, answers=answers)
