"""Retrieval metrics as pure functions over run and qrels dicts.

- ``run``:   ``{qid: {pid: score}}`` (higher score = better rank; ties broken by pid);
- ``qrels``: ``{qid: {pid: rel}}`` (``rel > 0`` is relevant; graded gains for nDCG).

Definitions follow trec_eval / ranx: ``recall@k`` = relevant in top k / all relevant,
``mrr@k`` = 1 / rank of the first relevant in the top k, ``ndcg@k`` with linear gains
(``rel / log2(rank + 1)``), ``map`` = average precision over the whole ranking. A query of the
qrels with no relevant passage is not evaluated; a query missing from the run scores 0.

``r@2kt`` / ``r@5kt`` are XOR-TyDi's answer recall: the fraction of queries for which an answer
string occurs in the first 2,000 / 5,000 tokens of the retrieved passages concatenated in rank
order (their texts, without titles: the official predictions hold ``ctx["text"]``). As in
the official ``eval_xor_retrieve.py``: answers "yes"/"no" are skipped, a query
with no other answer is not counted, the match is a case-sensitive substring test on the
tokens joined by single spaces. The eval computes it from each passage's features, where the
passage is read (:func:`kt_features`), and replays each ranking from them
(:func:`replay_hit`, :mod:`qgscale.eval.answer_metrics`): the same verdict as
:func:`answer_hit` on the texts.

``acc@k`` is DPR's top-k retrieval accuracy (the NQ / TriviaQA number of the DPR paper): the
fraction of queries for which one of the first k passages contains an answer by DPR's
``has_answer`` (:mod:`qgscale.retrieval.answers`: NFD, DPR's tokens, lower-cased, a contiguous
token match) on the passage text without its title, as DPR's ``calculate_matches``.
Deviations, on purpose, as in :mod:`qgscale.retrieval.answers`: blank answers are ignored (DPR
counts one as a hit at rank 1) and so are ``yes`` / ``no`` (XOR-TyDi's boolean answers: DPR
would match the word), and a query left with no answer is not counted (DPR's denominator is
every question).

Tokens: NLTK's ``word_tokenize``, as the official script (:mod:`qgscale.eval.wordtok`: the
same function with NLTK's English Punkt parameters shipped in the package, no download). It
splits punctuation off words (``"Portland, Oregon."`` -> ``Portland , Oregon .``; quotes
become `````` / ``''``; ``don't`` -> ``do n't``), so an answer with punctuation
(``"Maharashtra, India"``) never matches the re-joined text, exactly as in the published
numbers. Whitespace tokens (``tokenize=str.split``) give other numbers: on 300 of DPR's
100-word passages NLTK counts 18.5 % more tokens (2,000 tokens end after 16.9 passages, not
20), and on XQuAD en with BM25 R@2kt is 0.992 with whitespace tokens against 0.884 with NLTK's
(``benchmarks/results/rkt_tokens.json``, ``benchmarks/rkt_tokens.py``).

Language views: :class:`LanguageMetrics` (added a block of queries at a time, holding running
sums) and :func:`evaluate_languages` (one block) compute the metrics per (query lang, corpus
lang) pair, per query language over the pooled corpus, and macro averages over pairs: ``x->en``
(cross-lingual pairs into English), ``cross_lingual`` (every pair with different languages)
and ``monolingual`` (the diagonal).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache

from qgscale.eval.wordtok import word_tokenize

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_METRICS = ("recall@1", "recall@5", "recall@10", "recall@20", "recall@100", "mrr@10",
                   "ndcg@10", "map")
YES_NO = frozenset({"yes", "no"})


def metric_names(ks: list[int]) -> list[str]:
    """The ranking metrics of every eval table, for the recall cut-offs ``ks``
    (``eval.k``); splits with answers add the answer metrics (:func:`report_names`)."""
    return [f"recall@{k}" for k in ks] + ["mrr@10", "ndcg@10", "map"]


def answer_names(answer_recall: bool, accuracy_ks: Iterable[int]) -> list[str]:
    """The answer metrics, in table order: R@2kt, R@5kt (``answer_recall``), then ``acc@k``
    for each of ``accuracy_ks``."""
    return (["r@2kt", "r@5kt"] if answer_recall else []) + [f"acc@{k}" for k in accuracy_ks]


def report_names(ks: list[int], answer_recall: bool = True, answer_accuracy: bool = True
                 ) -> list[str]:
    """Every column an eval table may show, in order: :func:`metric_names`, then the answer
    metrics that are on (:func:`answer_names`) for the splits that have answers."""
    return metric_names(ks) + answer_names(answer_recall, ks if answer_accuracy else ())


def ranking(scores: Mapping[str, float], k: int | None = None) -> list[str]:
    """Pids by descending score (ties: ascending pid), cut at ``k``."""
    ranked = sorted(scores, key=lambda pid: (-scores[pid], pid))
    return ranked if k is None else ranked[:k]


def recall_at_k(ranked: list[str], rels: Mapping[str, int], k: int) -> float:
    relevant = {p for p, r in rels.items() if r > 0}
    return sum(p in relevant for p in ranked[:k]) / len(relevant)


def mrr_at_k(ranked: list[str], rels: Mapping[str, int], k: int) -> float:
    for i, pid in enumerate(ranked[:k]):
        if rels.get(pid, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def ndcg_at_k(ranked: list[str], rels: Mapping[str, int], k: int) -> float:
    dcg = sum(max(rels.get(p, 0), 0) / math.log2(i + 2) for i, p in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg


def average_precision(ranked: list[str], rels: Mapping[str, int]) -> float:
    n_rel = sum(r > 0 for r in rels.values())
    hits, total = 0, 0.0
    for i, pid in enumerate(ranked):
        if rels.get(pid, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / n_rel


def _metric_fn(name: str):
    base, _, cut = name.partition("@")
    k = int(cut) if cut else None
    if base == "recall" and k:
        return lambda ranked, rels: recall_at_k(ranked, rels, k)
    if base == "mrr" and k:
        return lambda ranked, rels: mrr_at_k(ranked, rels, k)
    if base == "ndcg" and k:
        return lambda ranked, rels: ndcg_at_k(ranked, rels, k)
    if base == "map" and k is None:
        return average_precision
    raise ValueError(f"unknown metric {name!r}: use recall@k, mrr@k, ndcg@k or map")


def per_query(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS,
              qids: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """``{qid: {metric: value}}`` for every query of ``qrels`` (or ``qids``) with a relevant pid."""
    fns = {m: _metric_fn(m) for m in metrics}
    out: dict[str, dict[str, float]] = {}
    for qid in qrels if qids is None else qids:
        rels = qrels.get(qid, {})
        if not any(r > 0 for r in rels.values()):
            continue
        ranked = ranking(run.get(qid, {}))
        out[qid] = {m: fn(ranked, rels) for m, fn in fns.items()}
    return out


def mean(rows: Mapping[str, Mapping[str, float]], metrics: Iterable[str]) -> dict[str, float]:
    """Mean of each metric over the queries of ``rows`` plus ``n`` (0.0 when empty)."""
    metrics = list(metrics)
    n = len(rows)
    out = {m: (sum(r[m] for r in rows.values()) / n if n else 0.0) for m in metrics}
    out["n"] = n
    return out


def evaluate(run: Run, qrels: Qrels, metrics: Iterable[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean metrics over the evaluated queries (see the module docstring), with ``n``."""
    metrics = list(metrics)
    return mean(per_query(run, qrels, metrics), metrics)


Tokenizer = Callable[[str], list[str]]


def answer_hit(texts: Iterable[str], answers: Iterable[str], max_tokens: int,
               tokenize: Tokenizer = word_tokenize) -> bool | None:
    """XOR-TyDi answer recall for one query: None when it has no span answer (not counted)."""
    span = [a for a in answers if a not in YES_NO]
    if not span:
        return None
    tokens: list[str] = []
    for text in texts:
        tokens.extend(tokenize(text))
        if len(tokens) >= max_tokens:
            break
    joined = " ".join(tokens[:max_tokens])
    return any(a in joined for a in span)


def answer_recall_per_query(run: Run, passages: Mapping[str, str],
                            answers: Mapping[str, Iterable[str]],
                            max_tokens: Iterable[int] = (2000, 5000),
                            qids: Iterable[str] | None = None,
                            tokenize: Tokenizer = word_tokenize) -> dict[str, dict[str, float]]:
    """``{qid: {"r@2kt": 0/1, "r@5kt": 0/1}}`` over the queries of ``answers`` (or ``qids``).

    ``passages`` maps pid -> text (without its title: the official XOR-Retrieve predictions
    hold the passage texts only); ``tokenize``: see the module
    docstring (its tokens of a text are cached: passages recur across queries and cut-offs).
    """
    out: dict[str, dict[str, float]] = {}
    cached = lru_cache(maxsize=20_000)(lambda text: tuple(tokenize(text)))
    for qid in answers if qids is None else qids:
        if qid not in answers:
            continue
        ranked = ranking(run.get(qid, {}))
        missing = [p for p in ranked if p not in passages]
        if missing:
            raise KeyError(f"answer recall: no text for retrieved passage(s) {missing[:5]} "
                           f"(query {qid}); is the index built from this corpus?")
        row = {}
        for t in max_tokens:
            hit = answer_hit((passages[p] for p in ranked), answers[qid], t, cached)
            if hit is None:
                break
            row[f"r@{t // 1000}kt"] = float(hit)
        if row:
            out[qid] = row
    return out


def crossing_reach(span: Iterable[str]) -> int:
    """How far (in characters) a match of one of ``span`` that crosses the space joining two
    passages can reach into either: a crossing match contains that space, so only answers
    with a space cross, and each reaches at most its length - 1 into either side."""
    return max((len(a) - 1 for a in span if " " in a), default=0)


class Joined:
    """A passage's tokens as :func:`answer_hit` joins them: the text, and where each token
    ends in it (``ends[i]``: the length of the first ``i + 1`` tokens joined)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = tokens
        self.text = " ".join(tokens)
        self.ends = list(itertools.accumulate((len(t) + 1 for t in tokens), initial=-1))[1:]

    def first_match(self, span: Iterable[str]) -> int:
        """The fewest leading tokens whose joined text contains one of ``span`` (0: none)."""
        first = 0
        for a in span:
            at = self.text.find(a)
            if at >= 0:
                m = bisect.bisect_left(self.ends, at + len(a)) + 1
                first = m if not first else min(first, m)
        return first

    def edges(self, reach: int) -> tuple[list[str], str]:
        """The leading tokens and the joined text's last characters that a match across a
        passage boundary can reach (``reach``: :func:`crossing_reach`, or more)."""
        if not reach:
            return [], ""
        return list(self.tokens[:bisect.bisect_left(self.ends, reach) + 1]), self.text[-reach:]


KtFeatures = tuple[int, int, list[str], str]


def kt_features(tokens: Sequence[str], span: Sequence[str], reach: int | None = None
                ) -> KtFeatures:
    """A passage's part of :func:`answer_hit` for one query's span answers ``span`` (without
    yes / no): ``(n, first, head, tail)``: its token count, :meth:`Joined.first_match` and
    :meth:`Joined.edges` (``reach``: at least :func:`crossing_reach` of ``span``, the
    default). :func:`replay_hit` gives :func:`answer_hit` of a ranking from its passages'
    features, so each can be computed where the passage is read: ``first`` per (query,
    passage), the rest per passage with the largest reach of its queries."""
    j = Joined(tokens)
    return (len(tokens), j.first_match(span),
            *j.edges(crossing_reach(span) if reach is None else reach))


def replay_hit(features: Iterable[KtFeatures], span: Sequence[str], max_tokens: int
               ) -> bool:
    """:func:`answer_hit` of a ranking from its passages' :func:`kt_features` in rank order
    (``span``: the query's answers without yes / no, not empty): a match inside one passage's
    counted tokens, or across the space joining it to what came before."""
    if "" in span:
        return True  # in every text, as answer_hit's `in`
    reach = crossing_reach(span)
    crossing = [a for a in span if " " in a]
    seen, tail = 0, ""  # tokens so far; the joined text's last `reach` characters
    for n, first, head, end in features:
        if seen >= max_tokens:
            break
        if not n:  # no token: nothing joined, not even a space
            continue
        c = min(n, max_tokens - seen)
        if first and first <= c:
            return True
        if crossing and seen and any(a in f"{tail} {' '.join(head[:c])}" for a in crossing):
            return True
        if c < n:
            break
        if reach:
            tail = (f"{tail} {end}" if seen else end)[-reach:]
        seen += n
    return False


# passages whose DPR tokens acc@k keeps (about 7 KB each for a 100-word passage): tokenising
# one takes ~0.1 ms, so the cache is for passages many queries of a block retrieve
ACC_CACHE = 4096


def answer_accuracy_per_query(run: Run, passages: Mapping[str, str],
                              answers: Mapping[str, Iterable[str]], ks: Iterable[int],
                              match: str = "dpr", qids: Iterable[str] | None = None,
                              tokens: Callable[[str], tuple[str, ...]] | None = None
                              ) -> dict[str, dict[str, float]]:
    """``{qid: {"acc@k": 0/1 for k in ks}}`` over the queries of ``answers`` (or ``qids``)
    that have a usable answer: DPR's top-k retrieval accuracy (module docstring).

    ``passages`` maps pid -> passage text without its title (DPR matches the text only);
    ``tokens``: text -> DPR tokens (:func:`qgscale.retrieval.answers.dpr_tokens` with
    ``match``, cached here when not given: passages recur across queries). A query's ranking
    is scanned only up to its first passage with an answer."""
    from qgscale.retrieval.answers import answer_tokens, contains, dpr_tokens

    ks = sorted(set(ks))
    tokens = tokens or lru_cache(maxsize=ACC_CACHE)(lambda text: dpr_tokens(text, match))
    out: dict[str, dict[str, float]] = {}
    for qid in answers if qids is None else qids:
        want = answer_tokens(answers.get(qid, ()), match)
        if not want:
            continue
        first = None
        for rank, pid in enumerate(ranking(run.get(qid, {}), ks[-1])):
            if pid not in passages:
                raise KeyError(f"answer accuracy: no text for retrieved passage {pid!r} "
                               f"(query {qid}); is the index built from this corpus?")
            toks = tokens(passages[pid])
            if any(contains(toks, a) for a in want):
                first = rank
                break
        out[qid] = {f"acc@{k}": float(first is not None and first < k) for k in ks}
    return out


def _merge_rows(a: dict[str, dict[str, float]],
                b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-query rows of both (a query keeps the metrics it has)."""
    out = {q: dict(r) for q, r in a.items()}
    for q, r in b.items():
        out.setdefault(q, {}).update(r)
    return out


def _count(metric: str) -> str:
    """The count of a metric's family: ``n`` (ranking metrics: queries with qrels), ``n_kt``
    (answer recall) or ``n_acc`` (answer accuracy)."""
    return "n_kt" if metric.endswith("kt") else "n_acc" if metric.startswith("acc@") else "n"


COUNTS = ("n", "n_kt", "n_acc")


class Means:
    """Running means of per-query metric rows, block by block: each metric's mean over the
    queries that have it; ``n``, ``n_kt`` and ``n_acc`` count the queries of each family
    (:func:`_count`). Holds two numbers per metric, not the rows."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.n = dict.fromkeys(COUNTS, 0)

    def add(self, rows: Mapping[str, Mapping[str, float]]) -> None:
        for r in rows.values():
            for m, v in r.items():
                self.sums[m] += v
                self.counts[m] += 1
            for c in {_count(m) for m in r}:
                self.n[c] += 1

    def result(self, metrics: list[str]) -> dict:
        out: dict[str, float] = {m: self.sums[m] / self.counts[m] for m in metrics
                                 if self.counts.get(m)}
        out["n"] = self.n["n"]
        for c in {_count(m) for m in metrics} - {"n"}:
            out[c] = self.n[c]
        return out


def evaluated(v: Mapping[str, float]) -> bool:
    """Whether a view's result counted any query (in any metric family)."""
    return any(v.get(c) for c in COUNTS)


def macro(values: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over the groups that have it (a language pair with
    answers but no qrels has R@kt and no MRR: it neither drops MRR from the macro nor counts
    as 0 in it); ``groups`` = their count, and ``groups:<metric>`` the count of a metric that
    only some groups have."""
    values = list(values)
    out: dict[str, float] = {}
    names = sorted({k for v in values for k in v} - {*COUNTS, "groups"})
    for m in names:
        have = [v[m] for v in values if m in v]
        out[m] = sum(have) / len(have)
        if len(have) < len(values):
            out[f"groups:{m}"] = len(have)
    out["groups"] = len(values)
    return out


def pair_key(query_lang: str, corpus_lang: str) -> str:
    return f"{query_lang}->{corpus_lang}"


class LanguageMetrics:
    """Metrics per language pair, per query language and macro averages, added a block of
    queries at a time (:meth:`add`): it holds running sums per view, not the runs.

    ``pair_runs[(ql, cl)]`` ranks passages of language ``cl`` for the queries of language
    ``ql``; its qrels are those of ``qrels`` less the passages of another language (a pid
    not in ``passage_lang``, not in the corpus, stays in every pair's: a miss, as in the
    pooled view; with one corpus language, a pair's qrels are ``qrels``). ``pooled_run``
    (optional) ranks the whole multilingual corpus for every query: the per-query-language
    view. ``with_answers``: :meth:`add` gets answers and passages (pid -> text, no title),
    and R@2kt / R@5kt are added (``tokenize``: their tokens, see the module docstring).
    ``accuracy_ks``: :meth:`add` gets answers and bodies (pid -> text without the title), and
    ``acc@k`` is added for each k, with the answer match ``match``.
    """

    def __init__(self, metrics: Iterable[str] = DEFAULT_METRICS, with_answers: bool = False,
                 tokenize: Tokenizer = word_tokenize, accuracy_ks: Iterable[int] = (),
                 match: str = "dpr") -> None:
        from qgscale.retrieval.answers import dpr_tokens

        self.metrics = list(metrics)
        self.accuracy_ks = sorted(set(accuracy_ks))
        self.names = self.metrics + answer_names(with_answers, self.accuracy_ks)
        self.with_answers = with_answers
        self.tokenize = tokenize
        self.match = match
        self._dpr_tokens = lru_cache(maxsize=ACC_CACHE)(lambda text: dpr_tokens(text, match))
        self.pairs: dict[tuple[str, str], Means] = defaultdict(Means)
        self.query_langs: dict[str, Means] | None = None

    def add(self, pair_runs: Mapping[tuple[str, str], Run], qrels: Qrels,
            query_lang: Mapping[str, str], passage_lang: Mapping[str, str],
            pooled_run: Run | None = None,
            answers: Mapping[str, Iterable[str]] | None = None,
            passages: Mapping[str, str] | None = None,
            bodies: Mapping[str, str] | None = None, ranking_only: bool = False) -> None:
        """Add the queries of ``query_lang`` (qid -> language): a block of the split.
        ``ranking_only``: only their ranking metrics (the caller adds the answer metrics'
        rows: :meth:`add_rows`)."""
        if not ranking_only and self.with_answers and (answers is None or passages is None):
            raise ValueError("answer recall needs answers and passages (pid -> text)")
        if not ranking_only and self.accuracy_ks and (answers is None or bodies is None):
            raise ValueError("answer accuracy needs answers and bodies (pid -> text)")

        # the answer metrics of a run's queries of one language, once: they do not depend on
        # qrels, and one run is both the pair's and the pooled view with one corpus language
        answer_rows: dict[tuple[int, str], dict] = {}

        def rows_for(run: Run, ql: str, corpus_lang: str | None) -> dict:
            qids = by_lang.get(ql, [])
            sub = {q: ({p: r for p, r in qrels.get(q, {}).items()
                        if corpus_lang is None or passage_lang.get(p, corpus_lang) == corpus_lang})
                   for q in qids}
            rows = per_query(run, sub, self.metrics)
            if ranking_only:
                return rows
            if (id(run), ql) not in answer_rows:
                got: dict = {}
                if self.with_answers:
                    got = answer_recall_per_query(run, passages, answers, qids=qids,
                                                  tokenize=self.tokenize)
                if self.accuracy_ks:
                    got = _merge_rows(got, answer_accuracy_per_query(
                        run, bodies, answers, self.accuracy_ks, self.match, qids,
                        self._dpr_tokens))
                answer_rows[(id(run), ql)] = got
            return _merge_rows(rows, answer_rows[(id(run), ql)])

        by_lang: dict[str, list[str]] = {}
        for qid, lang in query_lang.items():
            by_lang.setdefault(lang, []).append(qid)
        for (ql, cl), run in sorted(pair_runs.items()):
            self.pairs[(ql, cl)].add(rows_for(run, ql, cl))
        if pooled_run is not None:
            if self.query_langs is None:
                self.query_langs = defaultdict(Means)
            for ql in sorted(by_lang):
                self.query_langs[ql].add(rows_for(pooled_run, ql, None))

    def add_rows(self, pair_rows: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
                 pooled_rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        """Add per-query metric rows computed elsewhere: ``{(query lang, corpus lang): rows}``
        of the pair views, ``{query lang: rows}`` of the pooled view (only where
        :meth:`add` got a pooled run)."""
        for key, rows in sorted(pair_rows.items()):
            self.pairs[key].add(rows)
        if self.query_langs is not None:
            for ql, rows in sorted(pooled_rows.items()):
                self.query_langs[ql].add(rows)

    def result(self) -> dict:
        """``{pairs, query_langs, query_langs_macro, macro}`` over every query added."""
        pairs = {pair_key(ql, cl): m.result(self.names) for (ql, cl), m in
                 sorted(self.pairs.items())}
        out: dict = {"pairs": pairs}
        if self.query_langs is not None:
            out["query_langs"] = {ql: m.result(self.names)
                                  for ql, m in sorted(self.query_langs.items())}
            out["query_langs_macro"] = macro(v for v in out["query_langs"].values()
                                             if evaluated(v))
        scored = {k: v for k, v in pairs.items() if evaluated(v)}
        split = {k: k.split("->") for k in scored}
        out["macro"] = {
            "x->en": macro(v for k, v in scored.items() if split[k][1] == "en"
                           and split[k][0] != "en"),
            "cross_lingual": macro(v for k, v in scored.items() if split[k][0] != split[k][1]),
            "monolingual": macro(v for k, v in scored.items() if split[k][0] == split[k][1]),
        }
        return out


def evaluate_languages(
    pair_runs: Mapping[tuple[str, str], Run],
    qrels: Qrels,
    query_lang: Mapping[str, str],
    passage_lang: Mapping[str, str],
    pooled_run: Run | None = None,
    metrics: Iterable[str] = DEFAULT_METRICS,
    answers: Mapping[str, Iterable[str]] | None = None,
    passages: Mapping[str, str] | None = None,
    tokenize: Tokenizer = word_tokenize,
    bodies: Mapping[str, str] | None = None,
    accuracy_ks: Iterable[int] = (),
    match: str = "dpr",
) -> dict:
    """:class:`LanguageMetrics` of one block: every query of ``query_lang``; with ``answers``,
    R@kt over ``passages`` (pid -> text without its title) and, for ``accuracy_ks``, acc@k over
    ``bodies`` (pid -> text) with the answer match ``match``."""
    acc = LanguageMetrics(metrics, answers is not None, tokenize, accuracy_ks, match)
    acc.add(pair_runs, qrels, query_lang, passage_lang, pooled_run, answers, passages, bodies)
    return acc.result()
