"""R@2kt / R@5kt and acc@k of a split's runs, with one pass over the corpus.

The answer metrics need the text of every retrieved passage. Read block by block, that is a
corpus scan per block of queries: MKQA's 260k queries make 16 blocks, so 16 scans per student.
Here each block's rankings go to a scratch folder instead (:meth:`AnswerRuns.add`). At the end
(:meth:`AnswerRuns.rows`), each corpus shard computes the features of its own (query, passage)
pairs where it is read (:func:`shard_features`, on Ray tasks through
:func:`qgscale.runtime.map_shards`):

- acc@k: whether DPR's match finds an answer in the passage text;
- R@kt: :func:`qgscale.eval.metrics.kt_features`.

Only those small features come back, and each ranking is replayed from them
(:func:`qgscale.eval.metrics.replay_hit`). The numbers are exactly those of
:func:`~qgscale.eval.metrics.answer_recall_per_query` and
:func:`~qgscale.eval.metrics.answer_accuracy_per_query` on the texts.

Memory: the split's pairs and their features, O(queries x top_k x views), never the corpus.
The tokenising (NLTK's words and DPR's tokens of each retrieved passage) runs on the tasks.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qgscale.data.corpus import _scan_shard, corpus_shards
from qgscale.data.keyindex import KeyIndex
from qgscale.data.schema import passage_text
from qgscale.errors import DataError
from qgscale.eval import metrics as M

Rows = dict[str, dict[str, float]]
RANKINGS = pa.schema([("view", pa.int32()), ("qid", pa.string()),
                      ("pids", pa.list_(pa.string()))])
PAIRS = pa.schema([("block", pa.int32()), ("qid", pa.string()), ("pid", pa.string())])
FEATURES = pa.schema([*PAIRS, ("n", pa.int32()), ("first", pa.int32()),
                      ("head", pa.list_(pa.string())), ("tail", pa.string()),
                      ("acc", pa.bool_())])


def span_answers(answers: Sequence[str] | None) -> list[str]:
    """The answers R@kt matches (yes / no left out: :func:`qgscale.eval.metrics.answer_hit`)."""
    return [a for a in answers or () if a not in M.YES_NO]


def shard_features(uri: str, pairs: KeyIndex, answers: KeyIndex, recall: bool,
                   match: str | None) -> pa.Table | None:
    """The :data:`FEATURES` of the (query, passage) pairs of ``pairs`` (:data:`PAIRS` by pid)
    whose passage is in corpus shard ``uri``, with the queries' answers of ``answers``
    (``{qid, answers}`` by qid): R@kt's (:func:`qgscale.eval.metrics.kt_features` of the
    words of "title text") when ``recall``, acc@k's (DPR's match ``match`` on the text)
    unless it is None. None when no pair's passage is in the shard."""
    from qgscale.eval.wordtok import word_tokenize
    from qgscale.retrieval.answers import answer_tokens, contains, dpr_tokens

    cols = ["pid", "title", "text"]
    t = _scan_shard(uri, pairs, cols, cols)
    if t is None:
        return None
    at, row = pairs.find(t.column("pid"))
    out = pairs.table.take(pa.array(row)).select(PAIRS.names)
    titles, texts = t.column("title").to_pylist(), t.column("text").to_pylist()
    words: dict[int, list[str]] = {}  # a passage's, once for all its queries
    dpr: dict[int, tuple[str, ...]] = {}
    spans: dict[str, list[str]] = {}
    wanted: dict[str, list[tuple[str, ...]]] = {}
    feats: dict[str, list] = {c: [] for c in ("n", "first", "head", "tail", "acc")}
    qids = out.column("qid").to_pylist()
    for a, q, got in zip(at.tolist(), qids, answers.values(out.column("qid"), "answers"),
                         strict=True):
        given = [x for rows in got for x in rows or ()]
        if recall:
            if q not in spans:
                spans[q] = span_answers(given)
            if a not in words:
                words[a] = word_tokenize(passage_text(titles[a], texts[a]))
            n, first, head, tail = M.kt_features(words[a], spans[q])
        else:
            n, first, head, tail = None, None, None, None
        hit = None
        if match is not None:
            if q not in wanted:
                wanted[q] = answer_tokens(given, match)
            if a not in dpr:
                dpr[a] = dpr_tokens(texts[a], match)
            hit = any(contains(dpr[a], w) for w in wanted[q])
        for c, v in zip(feats, (n, first, head, tail, hit), strict=True):
            feats[c].append(v)
    for c, v in feats.items():
        out = out.append_column(FEATURES.field(c), pa.array(v, FEATURES.field(c).type))
    return out


class AnswerRuns:
    """The answer metrics' rows of a split's runs, added a block at a time (:meth:`add`: its
    rankings go to a scratch folder of this process) and computed at the end with one pass
    over the corpus at ``corpus_uri`` (:meth:`rows`; module docstring).

    ``answers``: qid -> answers; ``query_lang``: qid -> language; ``recall``: R@2kt /
    R@5kt; ``accuracy_ks``: acc@k for each k (none: off), with DPR's match ``match``."""

    def __init__(self, answers: Mapping[str, Sequence[str]], query_lang: Mapping[str, str],
                 corpus_uri: str, recall: bool, accuracy_ks: Sequence[int], match: str,
                 max_tokens: Sequence[int] = (2000, 5000)) -> None:
        from qgscale.retrieval.answers import answer_tokens

        self.answers, self.query_lang, self.corpus_uri = answers, query_lang, corpus_uri
        self.recall, self.ks, self.match = recall, sorted(set(accuracy_ks)), match
        self.max_tokens = list(max_tokens)
        self._usable = lambda q: bool((recall and span_answers(answers.get(q))) or (
            self.ks and answer_tokens(answers.get(q) or (), match)))
        self.dir = Path(tempfile.mkdtemp(prefix="qgscale-answer-runs-"))
        # removed by close(), or when this object goes (an eval that failed midway)
        self.close = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        # per block: the view number of each pair run ({(ql, cl): v}) and the pooled run's
        self.views: list[tuple[dict[tuple[str, str], int], int]] = []
        self.qids: list[str] = []  # the queries with usable answers, in block order

    def add(self, qids: Sequence[str], pooled: M.Run, pair_runs: Mapping[tuple[str, str], M.Run]
            ) -> None:
        """Keep the rankings of ``qids`` (those with usable answers): the pooled run's and each
        pair run's (a run given for several views is kept once)."""
        number: dict[int, int] = {}
        runs = []
        for run in [pooled, *pair_runs.values()]:
            if id(run) not in number:
                number[id(run)] = len(runs)
                runs.append(run)
        qids = [q for q in qids if self._usable(q)]
        self.qids += qids
        self.views.append(({key: number[id(run)] for key, run in pair_runs.items()}, 0))
        cols: dict[str, list] = {"view": [], "qid": [], "pids": []}
        for v, run in enumerate(runs):
            for q in qids:
                cols["view"].append(v)
                cols["qid"].append(q)
                cols["pids"].append(M.ranking(run.get(q, {})))
        pq.write_table(pa.table(cols, schema=RANKINGS), self._part(len(self.views) - 1))

    def _part(self, block: int) -> Path:
        return self.dir / f"block-{block:05d}.parquet"

    def _pairs(self) -> pa.Table:
        """Every block's distinct (query, passage) pairs (:data:`PAIRS`)."""
        parts = [PAIRS.empty_table()]
        for b in range(len(self.views)):
            t = pq.read_table(self._part(b), columns=["qid", "pids"])
            qid = t.column("qid").take(pc.list_parent_indices(t.column("pids")))
            parts.append(pa.table({"block": pa.array(np.full(len(qid), b, np.int32)),
                                   "qid": qid, "pid": pc.list_flatten(t.column("pids"))},
                                  schema=PAIRS))
        pairs = pa.concat_tables(parts)
        return pairs.group_by(PAIRS.names, use_threads=False).aggregate([]).select(PAIRS.names)

    def features(self) -> pa.Table:
        """The :data:`FEATURES` of every pair, one corpus pass (a shard per Ray task where
        :func:`qgscale.runtime.map_shards` uses them), sorted by block. A retrieved pid the
        corpus lacks is a KeyError, one on several corpus rows a DataError."""
        from qgscale.runtime import map_shards

        pairs = self._pairs()
        n_pairs, by_pid = pairs.num_rows, KeyIndex.build(pairs, "pid")
        del pairs  # the index holds them (sorted by pid)
        qids = sorted(set(self.qids))
        answers = KeyIndex.build(pa.table({"qid": pa.array(qids, pa.string()), "answers": pa.array(
            [list(self.answers.get(q) or ()) for q in qids], pa.list_(pa.string()))}), "qid")
        found = [FEATURES.empty_table()] + [t for t in map_shards(
            shard_features, corpus_shards(self.corpus_uri), by_pid, answers, self.recall,
            self.match if self.ks else None, wide=True) if t is not None]
        feats = pa.concat_tables(found)
        if feats.num_rows != n_pairs:
            self._name_bad(by_pid.table, feats)
        return feats.sort_by([("block", "ascending")])

    def _name_bad(self, pairs: pa.Table, feats: pa.Table) -> None:
        n = feats.group_by(PAIRS.names).aggregate([([], "count_all")])
        twice = n.filter(pc.greater(n.column("count_all"), 1))
        if twice.num_rows:
            raise DataError(f"{self.corpus_uri}: pid={twice.column('pid')[0]} is on several "
                            "corpus rows: a pid names one passage")
        lost = pairs.join(feats.select(PAIRS.names), PAIRS.names, join_type="left anti")
        q, p = lost.column("qid")[0].as_py(), lost.column("pid")[0].as_py()
        raise KeyError(f"answer metrics: no text for retrieved passage {p!r} (query {q}) in "
                       f"{self.corpus_uri}; is the index built from this corpus? "
                       f"({lost.num_rows} such pair(s))")

    def rows(self) -> Iterator[tuple[dict[tuple[str, str], Rows], dict[str, Rows]]]:
        """Per block, the answer metrics' rows ``(pair rows, pooled rows)`` for
        :meth:`qgscale.eval.metrics.LanguageMetrics.add_rows`."""
        if not self.qids:
            return
        feats = self.features()
        bounds = np.searchsorted(feats.column("block").to_numpy(), np.arange(len(self.views) + 1))
        for b, (pair_views, pooled_view) in enumerate(self.views):
            block = feats.slice(bounds[b], bounds[b + 1] - bounds[b])
            of = {(q, p): f for q, p, *f in zip(*(block.column(c).to_pylist() for c in (
                "qid", "pid", "n", "first", "head", "tail", "acc")), strict=True)}
            per_view: dict[int, Rows] = defaultdict(dict)
            t = pq.read_table(self._part(b))
            for v, q, pids in zip(*(t.column(c).to_pylist() for c in RANKINGS.names),
                                  strict=True):
                per_view[v][q] = self._row(self.answers.get(q), [of[q, p] for p in pids])
            def by_lang(rows: Rows) -> dict[str, Rows]:
                out: dict[str, Rows] = defaultdict(dict)
                for q, r in rows.items():
                    out[self.query_lang[q]][q] = r
                return out

            pair_rows = {(ql, cl): by_lang(per_view[v]).get(ql, {})
                         for (ql, cl), v in pair_views.items()}
            pooled = by_lang(per_view[pooled_view])
            yield pair_rows, pooled

    def _row(self, answers: Sequence[str] | None, feats: list[list]) -> dict[str, float]:
        """One query's answer metrics from its ranking's features."""
        from qgscale.retrieval.answers import answer_tokens

        row: dict[str, float] = {}
        span = span_answers(answers)
        if self.recall and span:
            for t in self.max_tokens:
                row[f"r@{t // 1000}kt"] = float(M.replay_hit(
                    ((n, first, head, tail) for n, first, head, tail, _ in feats), span, t))
        if self.ks and answer_tokens(answers or (), self.match):
            first = next((i for i, f in enumerate(feats[:self.ks[-1]]) if f[4]), None)
            row.update({f"acc@{k}": float(first is not None and first < k) for k in self.ks})
        return row
