"""BM25 over a corpus split into shards, with global term statistics.

Plain functions: nothing here needs Ray. A caller that holds the corpus in shards (Ray tasks,
one per shard) runs two passes::

    vocab = query_vocab(queries)                                            # optional
    stats = merge_stats([shard_stats(texts, vocab) for texts in shards])   # pass 1
    per_shard = [search_shard(texts, pids, queries, stats, k)               # pass 2
                 for texts, pids in shards]

and merges the shards' lists (score desc, ties by pid): ``qgscale.retrieval.sharded``'s
``merge_rows`` on Arrow tables of them, as the bm25 stages do.

Document frequencies, the number of passages and their total length are summed over the
shards before any score is computed, so a passage's score does not depend on which shard it
is in, and merging the shards' top-k lists gives exactly the top-k (ids and float32 scores)
of one index over the whole corpus. :func:`index_shard` builds a shard's index once for a
caller that searches it several times (its ``.stats()`` is pass 1, ``.search()`` pass 2);
``search_shard`` tokenises the shard again. Throughput on one core (50k English passages of
100 words): about 4-5k passages/s to tokenise and index, 500 queries/s to search.

Scoring is Lucene's BM25 (Anserini / pyserini, and ``bm25s``' ``method="lucene"``), with
pyserini's defaults ``k1=0.9``, ``b=0.4``::

    score(q, d) = sum over query tokens t (repeats count) of
                  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * len(d) / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Each query's terms are added in sorted order in float64 and the sums rounded to float32
(the CANDIDATES schema's type) before ranking; ties are broken by ascending pid. Only
passages sharing a token with the query are returned (fewer than k when few do).

Why not ``bm25s``: it computes document frequencies, N and the average length from the
passages it indexes, with no way to pass them in (short of overriding
``build_index_from_ids`` with its private scoring helpers), so per-shard ``bm25s`` indexes
give scores that are not comparable across shards. The tests check this module against
``bm25s`` on a single index (same scores) and against a single index of its own (3 shards
merged == 1 index, exactly).

Tokenisation (:func:`tokenize`, one function for every language, chosen by script, not by a
language tag): NFKC, case-folded; runs of letters, marks and digits are tokens; runs of the
scripts written without spaces between words -- Han, Hiragana, Katakana, Hangul, Thai, Lao,
Khmer, Myanmar -- become overlapping bigrams of characters (of grapheme clusters where
marks occur: a Thai vowel or tone mark stays with its consonant; a lone one: a unigram). This
is what Lucene's CJK analyzer does for zh/ja/ko (the analyzer of Anserini's CJK baselines),
applied to Thai and its neighbours too. Why bigrams rather than a word segmenter or a
multilingual subword tokenizer: no dictionary or model file to ship or download, the same
tokens whatever language tag a query or passage carries (mixed-script text works), fast and
deterministic; and a subword vocabulary such as mBERT's splits Han text into single
characters, which match far more passages than bigrams do. Marks are part of words, so
Devanagari, Bengali or Telugu vowel signs do not split words (Python's ``\\w`` would). No
stemming and no stopwords: both are per-language, and idf already weighs frequent tokens down.
"""

from __future__ import annotations

import itertools
import math
import unicodedata
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import regex

TOKENIZER = "nfkc-casefold-words+cjk-thai-bigrams/v1"
K1, B = 0.9, 0.4  # pyserini's defaults

# Scripts written without spaces between words (+ the prolonged sound mark and the Han
# iteration mark, whose script is Common).
_NOSPACE = (r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
            r"\u30FC\u3005")
_TOKEN = regex.compile(rf"(?P<ns>[{_NOSPACE}]+)|[[\p{{L}}\p{{M}}\p{{N}}]--[{_NOSPACE}]]+",
                       regex.V1)

_GRAPHEME = regex.compile(r"\X")
_MARK = regex.compile(r"\p{M}")

Ranked = tuple[list[list[str]], list[np.ndarray]]  # per query: pids, float32 scores


def tokenize(text: str) -> list[str]:
    """BM25 tokens of ``text`` (see the module docstring)."""
    out: list[str] = []
    for m in _TOKEN.finditer(unicodedata.normalize("NFKC", text).casefold()):
        tok = m.group()
        g = (_GRAPHEME.findall(tok) if _MARK.search(tok) else tok) if m.group("ns") else ()
        if len(g) > 1:  # Thai: ง่ + า, not ง + ่า
            out.extend("".join(g[i:i + 2]) for i in range(len(g) - 1))
        else:
            out.append(tok)
    return out


@dataclass
class Stats:
    """Term statistics of a set of passages: ``df[token]`` = passages containing it,
    ``n_docs``, ``total_len`` (tokens in all passages)."""

    df: dict[str, int] = field(default_factory=dict)
    n_docs: int = 0
    total_len: int = 0
    tokenizer: str = TOKENIZER

    @property
    def avgdl(self) -> float:
        return self.total_len / self.n_docs if self.n_docs else 0.0

    def idf(self, token: str) -> float:
        df = self.df.get(token, 0)
        return math.log(1.0 + (self.n_docs - df + 0.5) / (df + 0.5))


def merge_stats(stats: Iterable[Stats]) -> Stats:
    """The statistics of the union of disjoint shards (df, N and lengths summed)."""
    df: Counter[str] = Counter()
    out = Stats()
    for s in stats:
        if s.tokenizer != out.tokenizer:
            raise ValueError(f"cannot merge statistics of tokenizer {s.tokenizer!r} into "
                             f"{out.tokenizer!r}")
        df.update(s.df)
        out.n_docs += s.n_docs
        out.total_len += s.total_len
    out.df = dict(df)
    return out


class ShardIndex:
    """Inverted index of one shard: for each token (sorted), its passages and counts.
    Memory: about 8 bytes per distinct (token, passage) pair, plus the vocabulary -- on
    the order of 1 GB for a million 100-word passages."""

    def __init__(self, texts: Iterable[str], pids: Sequence[str]):
        self.pids = [str(p) for p in pids]
        ids: dict[str, int] = {}
        rows, cols, tfs, lengths = array("i"), array("i"), array("i"), array("q")
        for d, text in enumerate(texts):
            toks = tokenize(text)
            lengths.append(len(toks))
            counts = Counter(toks)
            rows.extend(ids.setdefault(tok, len(ids)) for tok in counts)
            cols.extend(itertools.repeat(d, len(counts)))
            tfs.extend(counts.values())
        if len(lengths) != len(self.pids):
            raise ValueError(f"{len(lengths)} texts but {len(self.pids)} pids")
        if len(set(self.pids)) != len(self.pids):
            raise ValueError("duplicate pids in the shard")
        self.doc_len = np.frombuffer(lengths, dtype=np.int64).copy()
        self.terms = sorted(ids)
        self.term_id = {t: i for i, t in enumerate(self.terms)}
        remap = np.empty(len(ids), dtype=np.int32)
        remap[[ids[t] for t in self.terms]] = np.arange(len(self.terms), dtype=np.int32)
        del ids
        term = remap[np.frombuffer(rows, dtype=np.int32)]
        del rows
        order = np.argsort(term, kind="stable")  # by token, then passage (rows are in order)
        self.docs = np.frombuffer(cols, dtype=np.int32)[order]
        self.tf = np.frombuffer(tfs, dtype=np.int32)[order]
        self.indptr = np.zeros(len(self.terms) + 1, dtype=np.int64)
        np.cumsum(np.bincount(term, minlength=len(self.terms)), out=self.indptr[1:])

    def __len__(self) -> int:
        return len(self.pids)

    def stats(self, only: Collection[str] | None = None) -> Stats:
        """This shard's statistics (to :func:`merge_stats` with the other shards');
        ``only``: document frequencies of these tokens only (see :func:`shard_stats`)."""
        df = np.diff(self.indptr).tolist()
        pairs = zip(self.terms, df, strict=True)
        if only is not None:
            pairs = ((t, n) for t, n in pairs if t in only)
        return Stats(dict(pairs), len(self.pids), int(self.doc_len.sum()))

    def search(self, queries: Sequence[str], stats: Stats, k: int, k1: float = K1,
               b: float = B) -> Ranked:
        """The top ``k`` passages of this shard for each query, scored with ``stats`` (the
        whole corpus'): ``(pids, scores)``, one list / float32 array per query."""
        if stats.tokenizer != TOKENIZER:
            raise ValueError(f"statistics of tokenizer {stats.tokenizer!r}, this index uses "
                             f"{TOKENIZER!r}")
        if stats.n_docs < len(self.pids) or stats.total_len < int(self.doc_len.sum()):
            raise ValueError(f"statistics of {stats.n_docs} passages / {stats.total_len} "
                             f"tokens do not include this shard ({len(self.pids)} / "
                             f"{int(self.doc_len.sum())}): merge every shard's stats first")
        avgdl = stats.avgdl or 1.0
        norm = k1 * (1.0 - b + b * self.doc_len / avgdl)
        acc = np.zeros(len(self.pids), dtype=np.float64)
        weights: dict[int, np.ndarray] = {}  # token -> its postings' weights (frequent ones)
        out_pids: list[list[str]] = []
        out_scores: list[np.ndarray] = []
        for q in queries:
            matched = False
            for tok, qtf in sorted(Counter(tokenize(q)).items()):
                t = self.term_id.get(tok)
                if t is None:
                    continue
                s, e = self.indptr[t], self.indptr[t + 1]
                docs = self.docs[s:e]
                w = weights.get(t)
                if w is None:
                    df = stats.df.get(tok, 0)
                    if df < e - s:
                        raise ValueError(f"statistics give token {tok!r} a document "
                                         f"frequency of {df}, below this shard's: merge every "
                                         "shard's stats first")
                    tf = self.tf[s:e].astype(np.float64)
                    w = stats.idf(tok) * (tf / (tf + norm[docs]))
                    if e - s >= 256:
                        weights[t] = w
                acc[docs] += w if qtf == 1 else qtf * w
                matched = True
            if not matched:
                out_pids.append([])
                out_scores.append(np.zeros(0, dtype=np.float32))
                continue
            cand = np.flatnonzero(acc)  # every weight is > 0: the passages with a query token
            scores = acc[cand].astype(np.float32)
            acc[cand] = 0.0
            if len(cand) > k:
                kth = np.partition(scores, len(scores) - k)[len(scores) - k]
                keep = scores >= kth  # every tie of the k-th score, cut below by pid
                cand, scores = cand[keep], scores[keep]
            best = sorted(zip(scores.tolist(), cand.tolist(), strict=True),
                          key=lambda x: (-x[0], self.pids[x[1]]))[:k]
            out_pids.append([self.pids[d] for _, d in best])
            out_scores.append(np.asarray([s for s, _ in best], dtype=np.float32))
        return out_pids, out_scores


def index_shard(texts: Iterable[str], pids: Sequence[str]) -> ShardIndex:
    """Tokenise and index one shard's passage texts (title and text as they should match)."""
    return ShardIndex(texts, pids)


def query_vocab(queries: Iterable[str]) -> set[str]:
    """The tokens of ``queries``: the only document frequencies their search reads."""
    return {t for q in queries for t in tokenize(q)}


def shard_stats(texts: Iterable[str], only: Collection[str] | None = None) -> Stats:
    """Pass 1: the term statistics of one shard's passage texts.

    ``only`` (e.g. ``query_vocab(queries)``): count document frequencies of these tokens
    only -- exactly what searching those queries needs (N and lengths still count every
    token), and far smaller than a Wikipedia vocabulary to send between tasks and merge.
    """
    df: Counter[str] = Counter()
    n = total = 0
    for text in texts:
        toks = tokenize(text)
        df.update(set(toks) if only is None else {t for t in toks if t in only})
        n += 1
        total += len(toks)
    return Stats(dict(df), n, total)


def search_shard(shard_texts: Iterable[str], shard_pids: Sequence[str],
                 queries: Sequence[str], stats: Stats, k: int, k1: float = K1,
                 b: float = B) -> Ranked:
    """Pass 2: the top ``k`` of one shard for each query, scored with the merged ``stats``."""
    return ShardIndex(shard_texts, shard_pids).search(queries, stats, k, k1, b)


def search(texts: Sequence[str], pids: Sequence[str], queries: Sequence[str], k: int,
           k1: float = K1, b: float = B) -> Ranked:
    """One index over all ``texts`` (no shards): its own statistics."""
    index = ShardIndex(texts, pids)
    return index.search(queries, index.stats(), k, k1, b)
