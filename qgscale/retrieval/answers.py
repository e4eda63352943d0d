"""Training examples from answers: DPR's answer match over retrieved passages.

A passage is a positive for a question when it contains one of the question's answers by
DPR's definition (``dpr.data.qa_validation.has_answer`` with ``match_type="string"``, the
one DPR used to build its NQ / TriviaQA training data and to score top-k retrieval accuracy):

1. passage and answer are NFD-normalised (``unicodedata.normalize("NFD", ...)``);
2. both are tokenised with DPR's ``SimpleTokenizer`` (DrQA's): a token is a run of letters,
   digits and marks (``[\\p{L}\\p{N}\\p{M}]+``) or a single other non-space character, so
   punctuation is kept, each mark its own token; nothing is removed (no article or
   punctuation stripping: that is DPR's reader EM normalisation, not ``has_answer``);
3. tokens are lower-cased, and the answer must occur as a contiguous token sequence.

DPR matches the passage text without its title; pass the texts you want matched.

Deviations, each on purpose: answers that tokenise to nothing (blank or only spaces) are
ignored (DPR would match them everywhere), and so are ``yes`` / ``no`` (XOR-TyDi's boolean
answers, which its evaluation skips too). ``match="dpr-chars"`` is an extension for text
without spaces between words: DPR's tokens of Chinese, Japanese or Thai are whole clauses, so
an answer almost never equals a token sequence there; this mode splits each character of
those scripts off its token (after NFD), on both sides, keeping the runs of other characters
whole (``1964年`` -> ``1964``, ``年``: a Latin or digit answer beside them still matches),
which for those scripts is a substring test and for every other script is exactly
``match="dpr"``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex

from qgscale import storage
from qgscale.errors import DataError

# DPR's SimpleTokenizer (dpr/utils/tokenizers.py): ALPHA_NUM | NON_WS, same flags.
_SIMPLE = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                        flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)
_NOSPACE_CHARS = (r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\p{Thai}\p{Lao}"
                  r"\p{Khmer}\p{Myanmar}\u30FC\u3005]")
_NOSPACE = regex.compile(_NOSPACE_CHARS)
# a DPR token split for dpr-chars: each character of those scripts, and each run of others
_CHARS = regex.compile(rf"{_NOSPACE_CHARS}|(?:(?!{_NOSPACE_CHARS}).)+", flags=regex.DOTALL)
MATCHES = ("dpr", "dpr-chars")
YES_NO = frozenset({"yes", "no"})


def dpr_tokens(text: str, match: str = "dpr") -> tuple[str, ...]:
    """The lower-cased tokens ``has_answer`` compares (see the module docstring)."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")
    words = [m.group().lower() for m in _SIMPLE.finditer(unicodedata.normalize("NFD", text))]
    if match == "dpr-chars":
        words = [c for w in words
                 for c in (_CHARS.findall(w) if _NOSPACE.search(w) else (w,))]
    return tuple(words)


def contains(text: tuple[str, ...], answer: tuple[str, ...]) -> bool:
    """Whether the token sequence ``answer`` occurs contiguously in ``text``."""
    n = len(answer)
    first = answer[0]
    return any(text[i:i + n] == answer
               for i in range(len(text) - n + 1) if text[i] == first)


def has_answer(answers: Iterable[str], text: str, match: str = "dpr") -> bool:
    """DPR's ``has_answer(answers, text, SimpleTokenizer(), "string")`` (module docstring)."""
    toks = dpr_tokens(text, match)
    return any(contains(toks, a) for a in answer_tokens(answers, match))


def pair_hits(texts: Sequence[str], at: Iterable[int], queries: Iterable[Hashable],
              answers_of: Mapping[Hashable, Iterable[str] | None], match: str = "dpr"
              ) -> np.ndarray:
    """:func:`has_answer` of each pair ``(texts[at[i]], answers_of[queries[i]])`` (bool
    array), for the answer checks over many (query, passage) pairs of a corpus shard: each
    query's answers' tokens computed once, and a text's tokens once for its adjacent pairs
    (group the pairs by text, as :meth:`qgscale.data.keyindex.KeyIndex.find` gives them:
    only the current text's tokens are held)."""
    wanted: dict[Hashable, list[tuple[str, ...]]] = {}
    last, tokens = None, ()
    out = []
    for a, q in zip(at, queries, strict=True):
        if q not in wanted:
            wanted[q] = answer_tokens(answers_of[q] or (), match)
        if wanted[q] and a != last:
            last, tokens = a, dpr_tokens(texts[a], match)
        out.append(bool(wanted[q]) and any(contains(tokens, w) for w in wanted[q]))
    return np.array(out, dtype=bool)


def answer_tokens(answers: Iterable[str], match: str) -> list[tuple[str, ...]]:
    """The usable answers' tokens (blank ones and yes / no left out: module docstring)."""
    out = []
    for a in answers:
        if a.strip().lower() in YES_NO:
            continue
        toks = dpr_tokens(a, match)
        if toks:
            out.append(toks)
    return out


def answer_match_examples(queries: Iterable[str], answers: Mapping[str, Sequence[str]],
                          retrieved_pids: Mapping[str, Sequence[str]],
                          passage_texts: Mapping[str, str], n_neg: int,
                          n_pos: int | None = None, match: str = "dpr",
                          cache_size: int = 100_000) -> list[dict[str, Any]]:
    """TRAIN_EXAMPLES rows ``{qid, pos_pids, neg_pids}`` from answers and retrieval results.

    For each qid of ``queries``: its retrieved pids (rank order) that contain an answer are
    positives (the first ``n_pos``, default all), the first ``n_neg`` that do not are its
    hard negatives. A query without a usable answer or without any positive gets no row (the
    caller can count them: ``len(queries) - len(rows)``). ``passage_texts``: pid -> the text
    to match (DPR: the passage text without its title); a retrieved pid without a text
    raises KeyError. Tokenised passages are cached (``cache_size`` of them) across queries.
    """
    tokens = lru_cache(maxsize=cache_size)(lambda pid: dpr_tokens(passage_texts[pid], match))
    rows = []
    for qid in queries:
        ans = answer_tokens(answers.get(qid, ()), match)
        if not ans:
            continue
        pos: list[str] = []
        neg: list[str] = []
        for pid in retrieved_pids.get(qid, ()):
            if pid not in passage_texts:
                raise KeyError(f"answer match: no text for retrieved passage {pid!r} "
                               f"(query {qid})")
            toks = tokens(pid)
            if any(contains(toks, a) for a in ans):
                if n_pos is None or len(pos) < n_pos:
                    pos.append(pid)
            elif len(neg) < n_neg:
                neg.append(pid)
            if n_pos is not None and len(pos) >= n_pos and len(neg) >= n_neg:
                break
        if pos:
            rows.append({"qid": qid, "pos_pids": pos, "neg_pids": neg})
    return rows


def read_answers(uri: str) -> dict[str, list[str]]:
    """qid -> answers from a prepared split's ``answers`` table (ANSWERS; a qid on two rows
    is a DataError: :func:`check_answer_qids`)."""
    table = storage.read_parquet(uri)
    missing = [c for c in ("qid", "answers") if c not in table.column_names]
    if missing:
        raise DataError(f"{uri}: missing field(s) {missing}")
    check_answer_qids(table.column("qid"), uri)
    return dict(zip(table.column("qid").to_pylist(), table.column("answers").to_pylist(),
                    strict=True))


def check_answer_qids(qids: pa.ChunkedArray | pa.Array, uri: str) -> None:
    """One answers row per query: a qid on two rows is a DataError naming both (rows in the
    table's file order), so that every reader of the table sees the same answers."""
    if pc.count_distinct(qids).as_py() == len(qids):
        return
    first: dict[str, int] = {}
    for i, q in enumerate(qids.to_pylist()):
        if q in first:
            raise DataError(f"{uri}: rows {first[q]} and {i}: qid {q!r} twice (one answers "
                            "row per query)")
        first[q] = i
