"""R@2kt / R@5kt and acc@k of a split's runs, with one pass over the corpus.

The answer metrics need the text of every retrieved passage. Read block by block, that is a
corpus scan per block of queries: MKQA's 260k queries make 16 blocks, so 16 scans per student.
Here each block's rankings go to a scratch folder instead (:meth:`AnswerRuns.add`). At the end
(:meth:`AnswerRuns.rows`), each corpus shard computes the features of its own (query, passage)
pairs where it is read (:func:`shard_features`, on Ray tasks through
:func:`qgscale.runtime.map_shards`):

- acc@k: whether DPR's match finds an answer in the passage text (per pair);
- R@kt: the fewest leading tokens that contain an answer (per pair), and the passage's token
  count and the edges a match across passages can reach (per passage;
  :class:`qgscale.eval.metrics.Joined`).

Only those features come back, and each ranking is replayed from them
(:func:`qgscale.eval.metrics.replay_hit`). The numbers are exactly those of
:func:`~qgscale.eval.metrics.answer_recall_per_query` and
:func:`~qgscale.eval.metrics.answer_accuracy_per_query` on the texts.

Memory: the split's pairs (a query number and a pid each) and their features, O(queries x
top_k x views), and with R@kt a row of edges per retrieved passage (its pid, its token count
and, for queries with an answer of several words, a few of its words); never the corpus. The
tokenising (NLTK's words and DPR's tokens of each retrieved passage) runs on the tasks, each
holding one passage's tokens at a time.
"""

from __future__ import annotations

import os
import shutil
import socket
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
from qgscale.errors import DataError
from qgscale.eval import metrics as M

Rows = dict[str, dict[str, float]]
RANKINGS = pa.schema([("view", pa.int32()), ("q", pa.int32()), ("pids", pa.list_(pa.string()))])
PAIRS = pa.schema([("q", pa.int32()), ("pid", pa.string())])  # q: AnswerRuns.qids position
NO_EDGES = (0, [], "")  # acc@k alone: no R@kt features
EDGES = pa.schema([("pid", pa.string()), ("n", pa.int32()), ("head", pa.list_(pa.string())),
                   ("tail", pa.string())])


def span_answers(answers: Sequence[str] | None) -> list[str]:
    """The answers R@kt matches (yes / no left out: :func:`qgscale.eval.metrics.answer_hit`)."""
    return [a for a in answers or () if a not in M.YES_NO]


def shard_features(uri: str, pairs: KeyIndex, answers: pa.ListArray, recall: bool,
                   match: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Table
                                               ] | None:
    """The features of the (query, passage) pairs of ``pairs`` (:data:`PAIRS` by pid) whose
    passage is in corpus shard ``uri`` (``answers``: each query number's answers):
    ``(pair rows, first, hit, edges)``: the pairs' rows in ``pairs.table``; R@kt's
    :meth:`~qgscale.eval.metrics.Joined.first_match` of the words of the text without its
    title, as XOR-TyDi's official predictions hold it (0 unless ``recall``); acc@k's DPR
    match ``match`` on the text (False when None); and, when ``recall``, each passage's
    :data:`EDGES` for the largest reach of its queries. None when no pair's passage is in the
    shard."""
    from qgscale.eval.wordtok import word_tokenize
    from qgscale.retrieval.answers import pair_hits

    cols = ["pid", "text"]
    t = _scan_shard(uri, pairs, cols, cols)
    if t is None:
        return None
    at, row = pairs.find(t.column("pid"))
    order = np.argsort(at, kind="stable")  # a passage's pairs adjacent (find gives them so)
    at, row = at[order], row[order]
    qs = pairs.table.column("q").take(pa.array(row)).to_numpy()
    distinct = np.unique(qs)
    given = dict(zip(distinct.tolist(), answers.take(pa.array(distinct)).to_pylist(),
                     strict=True))
    texts = t.column("text").to_pylist()
    hit = (pair_hits(texts, at.tolist(), qs.tolist(), given, match) if match is not None
           else np.zeros(len(row), bool))
    first = np.zeros(len(row), np.int32)
    edges = EDGES.empty_table()
    if recall:
        spans = {q: span_answers(given[q]) for q in given}
        reach = {q: M.crossing_reach(s) for q, s in spans.items()}
        pids = t.column("pid").to_pylist()
        out: dict[str, list] = {"pid": [], "n": [], "head": [], "tail": []}
        # a passage's pairs are adjacent: its words are held while they are used
        starts = np.flatnonzero(np.r_[True, at[1:] != at[:-1], True])
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
            a = int(at[lo])
            words = M.Joined(word_tokenize(texts[a]))
            for i in range(lo, hi):
                first[i] = words.first_match(spans[int(qs[i])])
            head, tail = words.edges(max(reach[int(q)] for q in qs[lo:hi]))
            for c, v in zip(out, (pids[a], len(words.tokens), head, tail), strict=True):
                out[c].append(v)
        edges = pa.table(out, schema=EDGES)
    return row, first, hit, edges


def _edges_of(edges: KeyIndex, pids: pa.Array) -> dict[str, tuple[int, list[str], str]]:
    """pid -> ``(n, head, tail)`` of ``pids`` from the :data:`EDGES` index."""
    t = edges.table.take(pa.array(edges.find(pids)[1]))
    return dict(zip(t.column("pid").to_pylist(), zip(
        *(t.column(c).to_pylist() for c in ("n", "head", "tail")), strict=True), strict=True))


SCRATCH = "qgscale-answer-runs-"  # + host and pid: a killed worker's folder is found


def scratch_prefix() -> str:
    """This process's scratch folders' prefix: its host (a temp folder several hosts or
    containers share keeps theirs) and its pid."""
    return f"{SCRATCH}{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def sweep_scratch(prefix: str, root: str | None = None) -> list[str]:
    """Remove the scratch folders ``<root>/<prefix><host>-<pid>-*`` (``root``: the temp
    folder) of this host whose process is gone (a worker killed mid-eval never ran its
    clean-up); returns them."""
    root = root or tempfile.gettempdir()
    prefix = f"{prefix}{socket.gethostname().replace('-', '_')}-"
    gone = []
    for entry in os.scandir(root):
        owner = entry.name.removeprefix(prefix).split("-", 1)[0]
        if not (entry.name.startswith(prefix) and owner.isdigit() and entry.is_dir()):
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:  # no such process: its folder is stale
            shutil.rmtree(entry.path, ignore_errors=True)
            gone.append(entry.path)
        except PermissionError:  # another user's live process
            pass
    return gone


class AnswerRuns:
    """The answer metrics' rows of a split's runs, added a block at a time (:meth:`add`: its
    rankings go to a scratch folder of this process) and computed at the end with one pass
    over the corpus at ``corpus_uri`` (:meth:`rows`; module docstring).

    ``answers``: qid -> answers; ``query_lang``: qid -> language; ``recall``: R@2kt /
    R@5kt; ``accuracy_ks``: acc@k for each k (none: off), with DPR's match ``match``."""

    def __init__(self, answers: Mapping[str, Sequence[str]], query_lang: Mapping[str, str],
                 corpus_uri: str, recall: bool, accuracy_ks: Sequence[int], match: str,
                 max_tokens: Sequence[int] = (2000, 5000)) -> None:
        self.answers, self.query_lang, self.corpus_uri = answers, query_lang, corpus_uri
        self.recall, self.ks, self.match = recall, sorted(set(accuracy_ks)), match
        self.max_tokens = list(max_tokens)
        sweep_scratch(SCRATCH)
        self.dir = Path(tempfile.mkdtemp(prefix=scratch_prefix()))
        # removed by close(), or when this object is collected (an eval that failed midway)
        self.close = weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.views: list[dict[tuple[str, str], int]] = []  # per block: each pair's view
        self.qids: list[str] = []  # the queries with usable answers; a pair's q indexes it
        self.spans: list[list[str]] = []  # by q: its R@kt answers (none: R@kt off)
        self.acc: list[bool] = []  # by q: whether it has an answer for acc@k
        self.starts = [0]  # where each block's queries start in qids

    def add(self, qids: Sequence[str], pooled: M.Run, pair_runs: Mapping[tuple[str, str], M.Run]
            ) -> None:
        """Keep the rankings of ``qids`` (those with usable answers): the pooled run's (view
        0) and each pair run's for the queries of its pair's language (a run given for
        several pairs is kept once)."""
        from qgscale.retrieval.answers import answer_tokens

        usable = []
        for q in qids:
            span = span_answers(self.answers.get(q)) if self.recall else []
            acc = bool(self.ks and answer_tokens(self.answers.get(q) or (), self.match))
            if span or acc:
                usable.append(q)
                self.spans.append(span)
                self.acc.append(acc)
        qids = usable
        number: dict[int, int] = {id(pooled): 0}
        runs, langs = [pooled], [None]  # a view's run and its query languages (None: all)
        for (ql, _), run in pair_runs.items():
            if id(run) not in number:
                number[id(run)] = len(runs)
                runs.append(run)
                langs.append(set())
            if langs[number[id(run)]] is not None:
                langs[number[id(run)]].add(ql)
        self.views.append({key: number[id(run)] for key, run in pair_runs.items()})
        first = len(self.qids)
        self.qids += qids
        self.starts.append(len(self.qids))
        cut = None if self.recall else self.ks[-1]  # acc@k alone reads the top max(k)
        cols: dict[str, list] = {"view": [], "q": [], "pids": []}
        for v, (run, these) in enumerate(zip(runs, langs, strict=True)):
            for i, q in enumerate(qids):
                if these is None or self.query_lang[q] in these:
                    cols["view"].append(v)
                    cols["q"].append(first + i)
                    cols["pids"].append(M.ranking(run.get(q, {}), cut))
        pq.write_table(pa.table(cols, schema=RANKINGS), self._part(len(self.views) - 1))

    def _part(self, block: int) -> Path:
        return self.dir / f"block-{block:05d}.parquet"

    def _pairs(self) -> pa.Table:
        """Every block's distinct (query, passage) pairs (:data:`PAIRS`), deduplicated block
        by block (a query number is in one block only)."""
        parts = [PAIRS.empty_table()]
        for b in range(len(self.views)):
            t = pq.read_table(self._part(b), columns=["q", "pids"])
            pairs = pa.table({"q": t.column("q").take(pc.list_parent_indices(t.column("pids"))),
                              "pid": pc.list_flatten(t.column("pids"))}, schema=PAIRS)
            parts.append(pairs.group_by(PAIRS.names, use_threads=False).aggregate([])
                         .select(PAIRS.names).cast(PAIRS))
        return pa.concat_tables(parts)

    def features(self) -> tuple[pa.Table, np.ndarray, np.ndarray, KeyIndex]:
        """``(pairs, first, hit, edges)``: every pair (:data:`PAIRS`), its R@kt first match
        and acc@k hit (arrays by pair row), and the retrieved passages' :data:`EDGES` by pid:
        one corpus pass (a shard per Ray task where :func:`qgscale.runtime.map_shards` uses
        them, with the driver's window: the eval's search actors wait meanwhile). A
        retrieved pid the corpus lacks is a KeyError, one on several corpus rows a
        DataError."""
        from qgscale.runtime import map_shards

        by_pid = KeyIndex.build(self._pairs(), "pid")
        n = len(by_pid)
        first, hit = np.zeros(n, np.int32), np.zeros(n, bool)
        found = np.zeros(n, np.int32)
        edges = [EDGES.empty_table()]
        if n:
            answers = pa.array([list(self.answers.get(q) or ()) for q in self.qids],
                               pa.list_(pa.string()))
            for out in map_shards(shard_features, corpus_shards(self.corpus_uri), by_pid,
                                  answers, self.recall, self.match if self.ks else None,
                                  cluster_window=True):
                if out is not None:
                    rows, f, h, e = out
                    first[rows], hit[rows] = f, h
                    np.add.at(found, rows, 1)
                    edges.append(e)
        pairs = by_pid.table
        if (found != 1).any():
            i = int(np.flatnonzero(found != 1)[0])
            pid, q = pairs.column("pid")[i].as_py(), self.qids[pairs.column("q")[i].as_py()]
            if found[i]:
                raise DataError(f"{self.corpus_uri}: pid={pid} is on several corpus rows: a "
                                "pid names one passage")
            raise KeyError(f"answer metrics: no text for retrieved passage {pid!r} (query {q})"
                           f" in {self.corpus_uri}; is the index built from this corpus? "
                           f"({int((found == 0).sum())} such pair(s))")
        return pairs, first, hit, KeyIndex.build(pa.concat_tables(edges), "pid")

    def rows(self) -> Iterator[tuple[dict[tuple[str, str], Rows], dict[str, Rows]]]:
        """Per block, the answer metrics' rows ``(pair rows, pooled rows)`` for
        :meth:`qgscale.eval.metrics.LanguageMetrics.add_rows`."""
        if not self.qids:
            return
        pairs, first, hit, edges = self.features()
        q_of = pairs.column("q").to_numpy()
        order = np.argsort(q_of, kind="stable")
        bounds = np.searchsorted(q_of[order], self.starts)
        for b, pair_views in enumerate(self.views):
            rows = order[bounds[b]:bounds[b + 1]]
            pids = pairs.column("pid").take(pa.array(rows))
            of = {(q, p): (f, h) for q, p, f, h in zip(
                q_of[rows].tolist(), pids.to_pylist(), first[rows].tolist(),
                hit[rows].tolist(), strict=True)}
            edge = _edges_of(edges, pc.unique(pids)) if self.recall else {}
            per_view: dict[int, dict[str, Rows]] = defaultdict(lambda: defaultdict(dict))
            t = pq.read_table(self._part(b))
            for v, q, ranked in zip(*(t.column(c).to_pylist() for c in RANKINGS.names),
                                    strict=True):
                qid = self.qids[q]
                per_view[v][self.query_lang[qid]][qid] = self._row(self.spans[q], self.acc[q], [
                    (*(edge[p] if self.recall else NO_EDGES), *of[q, p]) for p in ranked])
            yield ({(ql, cl): dict(per_view[v][ql]) for (ql, cl), v in pair_views.items()},
                   {ql: dict(r) for ql, r in per_view[0].items()})

    def _row(self, span: list[str], acc: bool, feats: list[tuple]) -> dict[str, float]:
        """One query's answer metrics (``span``: its span answers; ``acc``: whether it has an
        answer for acc@k) from its ranking's features ``(n, head, tail, first, hit)``."""
        row: dict[str, float] = {}
        if span:  # empty when R@kt is off
            for t in self.max_tokens:
                row[f"r@{t // 1000}kt"] = float(M.replay_hit(
                    ((n, f, head, tail) for n, head, tail, f, _ in feats), span, t))
        if acc:
            first = next((i for i, f in enumerate(feats[:self.ks[-1]]) if f[4]), None)
            row.update({f"acc@{k}": float(first is not None and first < k) for k in self.ks})
        return row
