"""Readers that convert raw datasets into qgscale's canonical tables.

Every reader validates as it reads. A defect of a row (malformed JSON, a missing or empty
field, a wrong type, undecodable bytes, an id already seen earlier in the file) is reported
through :class:`Rejects`: by default it raises :class:`~qgscale.errors.DataError` naming file,
line and field; with ``on_error="skip"`` the row is kept aside with its reason (written to
``_rejected.jsonl``) and counted. Nothing is dropped silently. A defect of a whole file (an
empty file, corrupt or truncated compressed data (gzip, bz2, xz), a missing file) always raises.
"""

from __future__ import annotations

import ast
import codecs
import csv
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import os
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fsspec
import pyarrow as pa

from qgscale.data.schema import SCHEMAS
from qgscale.data.unique import duplicate_reason
from qgscale.errors import ConfigError, DataError, MissingInputError
from qgscale.storage import is_local, writing_file

JSONL_FILE = re.compile(r"\.jsonl(\.(gz|bz2|xz))?$")  # a passage collection's JSONL
XQUAD_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]

log = logging.getLogger(__name__)
Tables = dict[str, list[dict[str, Any]]]  # kind ("corpus", "train/queries", ...) -> rows
HELD_REJECTS = 100_000  # rejected rows held in memory; the later ones wait in a local file


@dataclass
class Rejects:
    """Collects bad rows: raises at once in ``fail`` mode, records them in ``skip`` mode:
    the first ``held`` in :attr:`rows`, the later ones in a local temporary file (a dirty
    corpus of 1B passages may reject millions), all of them in order by iterating, counted
    by :attr:`count`, written by :meth:`write`."""

    mode: str = "fail"
    rows: list[dict[str, Any]] = field(default_factory=list)
    held: int = field(default_factory=lambda: HELD_REJECTS)
    files: set[str] = field(default_factory=set)  # the files of the rejected rows
    spilled: int = 0  # rows in the file
    _spill: Any = field(default=None, repr=False, compare=False)

    def bad(self, file: str, line: int | None, fld: str | None, reason: str,
            raw: Any = None) -> None:
        where = f"{file}:{line}" if line is not None else file
        msg = f"{where}: field {fld!r}: {reason}" if fld else f"{where}: {reason}"
        if self.mode != "skip":
            raise DataError(msg)
        self.add({"file": file, "line": line, "field": fld, "reason": reason,
                  "raw": raw if isinstance(raw, str | type(None)) else repr(raw)[:2000]})

    def add(self, row: dict[str, Any]) -> None:
        """Record a rejected row (``{file, line, field, reason, raw}``)."""
        self.files.add(row["file"])
        if len(self.rows) < self.held:
            self.rows.append(row)
            return
        if self._spill is None:  # a lone surrogate (from a JSON string) written as its escape
            self._spill = tempfile.TemporaryFile("w+", encoding="utf-8",
                                                 errors="backslashreplace")
        self._spill.seek(0, io.SEEK_END)
        self._spill.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.spilled += 1

    @property
    def count(self) -> int:
        return len(self.rows) + self.spilled

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.rows
        if self._spill is not None:
            self._spill.flush()
            pos = 0  # its own place: add() (between two rows) writes at the end
            while True:
                self._spill.seek(pos)
                line = self._spill.readline()
                if not line:
                    return
                pos = self._spill.tell()
                yield json.loads(line)

    def write(self, uri: str) -> None:
        """Every rejected row, in order, as JSONL to ``uri`` (streamed)."""
        with writing_file(uri) as tmp, open(tmp, "w", encoding="utf-8",
                                            errors="backslashreplace") as out:
            for row in self:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")


class FirstSeen:
    """Where each id of a table was first seen; a later row with the same id is a defect
    (a duplicate query id would reach qrels and eval twice, a duplicate passage id the index).
    """

    def __init__(self, what: str = "id"):
        self.what = what
        self.first: dict[Hashable, tuple[str, int | str | None]] = {}

    def new(self, key: Hashable, file: str, line: int | None, fld: str | None,
            rejects: Rejects, raw: Any = None, loc: str | None = None) -> bool:
        """True the first time ``key`` is seen; afterwards reports the row (naming both
        places and the id) and returns False. ``loc`` locates a row of a whole-document
        format without line numbers (``data[0].paragraphs[1].qas[2]``)."""
        where = line if line is not None else loc
        if key not in self.first:
            self.first[key] = (file, where)
            return True
        f0, w0 = self.first[key]
        rejects.bad(file, line, fld, duplicate_reason(self.what, key, file, f0, w0), raw)
        return False


def no_rows(path: str, detail: str = "empty file") -> DataError:
    return DataError(f"{path}: no rows ({detail})")


_CORRUPT = (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError)  # bad or truncated data
_READ_ERRORS = (OSError, *_CORRUPT)  # caught where a file is read: told apart by _read_error


def _is_corrupt(path: str, e: BaseException) -> bool:
    """Whether ``e``, raised reading ``path``, is bad or truncated compressed data: bz2 raises
    a bare ``OSError("Invalid data stream")``; any other OSError (a network's) is not."""
    return isinstance(e, _CORRUPT) or (type(e) is OSError and e.errno is None
                                       and str(e) == "Invalid data stream"
                                       and fsspec.utils.infer_compression(path) == "bz2")


def _read_error(path: str, e: BaseException, lines: int | None = None) -> BaseException:
    """What to raise for ``e`` (one of :data:`_READ_ERRORS`), raised reading ``path``:
    :func:`_corrupt` for bad compressed data, else ``e`` itself."""
    return _corrupt(path, e, lines) if _is_corrupt(path, e) else e


def _corrupt(path: str, e: BaseException, lines: int | None = None) -> DataError:
    after = f" after line {lines}" if lines else ""
    what = "truncated compressed data" if isinstance(e, EOFError) else \
        "corrupt compressed data"
    kind = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__
    return DataError(f"{path}: {what}{after} ({kind}: {e}); re-download or re-compress "
                     "the file")


def bundled(name: str) -> str:
    """Path of a data folder bundled in the package (``xquad``, ``tatoeba``, ``mkqa``)."""
    return str(resources.files("qgscale") / "resources" / name)


def _open(path: str):
    """``fsspec.open`` in binary mode (gz etc. by suffix); a missing file names its path."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise MissingInputError(f"{path}: input file not found")
    if fs.isdir(p):
        raise DataError(f"{path}: is a folder; this format reads a file")
    if is_local(path) or fsspec.utils.infer_compression(path) is not None:
        return fsspec.open(path, "rb", compression="infer")
    # s3fs reads ahead a block (50 MB by default) past a byte range's end: 8 MiB at most;
    # its readline reads (copies) a whole block per line: 1 MiB buffered here instead
    return io.BufferedReader(fs.open(p, "rb", block_size=8 << 20), 1 << 20)


def _open_text_lines(path: str, rejects: Rejects, keep_bad: bool = False,
                     span: Span | None = None) -> Iterator[tuple[int, str | None]]:
    """(line number, decoded line) for a text file; gz by suffix; a UTF-8 byte-order mark
    on line 1 is dropped; bad bytes are reported (and, with ``keep_bad``, yielded as None);
    corrupt or truncated compressed data raises :class:`DataError` with the last whole line read.

    ``span``: only the lines that start in its byte range of an uncompressed file, numbered
    from 1 within it (:class:`Span`; its ``lines`` counts them as they are read)."""
    n = 0
    with _open(path) as f:
        if span is not None and span.start:
            f.seek(span.start - 1)
            f.readline()  # the rest of the line that starts before the span
        pos = f.tell() if span is not None else 0
        lines = iter(f.readline, b"")
        while True:
            if span is not None and span.end is not None and pos >= span.end:
                return
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _READ_ERRORS as e:
                raise _read_error(path, e, n) from None
            n += 1
            if span is not None:
                pos += len(raw)
                span.lines, span.pos = n, pos
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                rejects.bad(path, n, None, f"undecodable bytes (not UTF-8): {e.reason} at "
                            f"byte {e.start}", raw.decode("utf-8", "replace"))
                if keep_bad:
                    yield n, None
                continue
            first = n == 1 and (span is None or not span.start)
            yield n, text.removeprefix("\ufeff") if first else text


class _DuplicateKey(Exception):
    """A JSON object holds ``key`` twice (json.loads would keep its last value silently)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of ``pairs`` (an ``object_pairs_hook``); a key twice raises _DuplicateKey."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)  # as fast as json.loads (measured)
DUPLICATE_KEY = "duplicate key in a JSON object (json keeps its last value only)"


def iter_jsonl(path: str, rejects: Rejects, span: Span | None = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL(.gz) file; a key twice in an
    object (at any depth) is a row defect naming the key; a file without
    any non-blank line raises :class:`DataError` ('no rows'). ``span``: its lines only
    (:func:`_open_text_lines`), non-blank ones counted in ``span.rows``, never 'no rows'."""
    rows = 0
    for n, line in _open_text_lines(path, rejects, span=span):
        if not line.strip():
            continue
        rows += 1
        if span is not None:
            span.rows = rows
        try:
            obj = _JSON.decode(line)
        except json.JSONDecodeError as e:
            rejects.bad(path, n, None, f"malformed JSON: {e.msg} (column {e.colno})", line)
            continue
        except _DuplicateKey as e:
            rejects.bad(path, n, e.key, DUPLICATE_KEY, line)
            continue
        if not isinstance(obj, dict):
            rejects.bad(path, n, None, f"expected a JSON object, got {type(obj).__name__}", line)
            continue
        yield n, obj
    if rows == 0 and span is None:
        raise no_rows(path)


def load_json(path: str) -> Any:
    """A whole JSON document (gz by suffix); bad bytes or syntax, corrupt compressed data or an
    empty file fail with file (and line)."""
    with _open(path) as f:
        try:
            raw = f.read()
        except _READ_ERRORS as e:
            raise _read_error(path, e) from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark, as JSONL's is dropped
    if not raw.strip():
        raise no_rows(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # a whole-document format cannot skip a line: always fail
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: undecodable bytes (not UTF-8): {e.reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None


_MISSING = object()
BAD_UNICODE = "invalid Unicode (lone surrogate)"


def bad_unicode(value: str) -> bool:
    """Whether ``value`` holds a lone surrogate (a JSON escape such as ``"\\ud800"``): no
    UTF-8 encodes it, so writing it would fail later, far from its file."""
    if value.isascii():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def get_lang(obj: dict, default: str, path: str, line: int | None, rejects: Rejects,
             name: str = "lang") -> str | None:
    """A row's own ``lang`` (a non-empty string, stripped), ``default`` when the row has no
    ``lang`` field; a ``lang`` of another type, null or empty is reported (None)."""
    if "lang" not in obj:
        return default
    value = get_str(obj, "lang", path, line, rejects, name=name)
    return value and value.strip()


def get_str(obj: dict, key: str, path: str, line: int | None, rejects: Rejects,
            allow_empty: bool = False, name: str | None = None) -> str | None:
    """``obj[key]`` as a non-empty string (valid Unicode), else report and return None."""
    value = obj.get(key, _MISSING)
    fld = name or key
    if value is _MISSING or value is None:
        rejects.bad(path, line, fld, "missing field", obj)
        return None
    if not isinstance(value, str):
        rejects.bad(path, line, fld, f"wrong type: expected string, got {type(value).__name__}",
                    obj)
        return None
    if bad_unicode(value):
        rejects.bad(path, line, fld, BAD_UNICODE, obj)
        return None
    if not allow_empty and not value.strip():
        rejects.bad(path, line, fld, "empty text", obj)
        return None
    return value


def get_id(obj: dict, key: str, path: str, line: int | None, rejects: Rejects,
           name: str | None = None) -> str | None:
    """An identifier: a non-empty string, or an integer (converted to a string)."""
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return get_str(obj, key, path, line, rejects, name=name)


# ---------------------------------------------------------------------------- XQuAD


def bundled_xquad_texts(langs: list[str] | None = None) -> list[str]:
    """Questions and paragraphs of the bundled XQuAD files (tokenizer training text)."""
    out: list[str] = []
    for lang in langs or XQUAD_LANGS:
        with gzip.open(f"{bundled('xquad')}/xquad.{lang}.json.gz", "rt", encoding="utf-8") as f:
            data = json.load(f)["data"]
        for article in data:
            for para in article["paragraphs"]:
                out.append(para["context"])
                out.extend(qa["question"] for qa in para["qas"])
    return out


def _xquad_file(folder: str, lang: str) -> str:
    for name in (f"xquad.{lang}.json", f"xquad.{lang}.json.gz"):
        path = f"{folder.rstrip('/')}/{name}"
        fs, p = fsspec.core.url_to_fs(path)
        if fs.exists(p):
            return path
    raise MissingInputError(f"{folder}: no xquad.{lang}.json(.gz)")


def _xquad_list(obj: Any, key: str, loc: str, path: str, rejects: Rejects) -> list | None:
    """``obj[key]``, a list, of the object at ``loc``; else reported (None)."""
    if not isinstance(obj, dict):
        rejects.bad(path, None, loc, f"wrong type: expected an object, got {type(obj).__name__}",
                    obj)
        return None
    value = obj.get(key)
    if not isinstance(value, list):
        what = "missing field" if value is None else \
            f"wrong type: expected a list, got {type(value).__name__}"
        rejects.bad(path, None, f"{loc}.{key}", what, obj)
        return None
    return value


def _xquad_parallel(a: Any, b: Any) -> bool:
    """Whether two XQuAD files' shapes (article -> paragraph -> question ids) match; a part
    rejected in either (None) matches anything."""
    if a is None or b is None:
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_xquad_parallel, a, b))
    return a == b


def _xquad_merged(a: Any, b: Any) -> Any:
    """The parts of two parallel shapes that either knows (not rejected in both)."""
    if a is None:
        return b
    if isinstance(a, list) and b is not None:
        return [_xquad_merged(x, y) for x, y in zip(a, b, strict=True)]
    return a


def read_xquad(folder: str, query_langs: list[str] | None = None,
               corpus_langs: list[str] | None = None, test_mod: int = 4,
               rejects: Rejects | None = None) -> Tables:
    """XQuAD (SQuAD v1.1 JSON, one file per language) as a cross-lingual benchmark.

    queries: each question per language, qid ``{lang}:{id}``; corpus: each paragraph per
    language, pid ``{lang}:{article}-{paragraph}``; qrels: a question -> its paragraph in every
    corpus language. Split by article: ``article_idx % test_mod == 0`` -> test, else train; the
    two splits share no article, so no test article ever reaches training data.

    The files are parallel: a question (or article, or paragraph's question list) rejected in
    one language's file is left out of every language, reported in each (skip mode), naming
    the file and place (``data[0].paragraphs[1].qas[2]``) where it was rejected.
    """
    rejects = rejects or Rejects()
    query_langs = query_langs or XQUAD_LANGS
    corpus_langs = corpus_langs or XQUAD_LANGS
    tables: Tables = {f"{s}/{k}": [] for s in ("train", "test")
                      for k in ("corpus", "queries", "qrels")}
    structure: Any = None  # article -> paragraph -> question ids; None: rejected in a file
    no_passage: dict[str, tuple[str, str]] = {}  # pid -> (file, field) of a rejected context
    gone: dict[tuple[int, ...], tuple[str, str]] = {}  # (a), (a, p), (a, p, q) -> file, place
    asked: dict[str, tuple[str, list[tuple[int, int, int, str, str]]]] = {}  # lang -> (file,
    for lang in sorted(set(query_langs) | set(corpus_langs)):  # [(a, p, q, id, question)])
        path = _xquad_file(folder, lang)
        doc = load_json(path)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise DataError(f"{path}: field 'data': missing or not a list (SQuAD v1.1 format)")
        shape: list[Any] = []
        seen = FirstSeen("question id")
        questions = 0
        kept = asked.setdefault(lang, (path, []))[1] if lang in query_langs else []
        for a_idx, article in enumerate(data):
            split = "test" if a_idx % test_mod == 0 else "train"
            aloc = f"data[{a_idx}]"
            paras = _xquad_list(article, "paragraphs", aloc, path, rejects)
            title = None if paras is None else "" if article.get("title") is None else \
                get_str(article, "title", path, None, rejects, allow_empty=True,
                        name=f"{aloc}.title")
            if title is None:
                gone.setdefault((a_idx,), (path, aloc))
                shape.append(None)
                continue
            title = title.replace("_", " ")
            ids: list[Any] = []
            for p_idx, para in enumerate(paras):
                loc = f"{aloc}.paragraphs[{p_idx}]"
                qas = _xquad_list(para, "qas", loc, path, rejects)
                if qas is None:
                    gone.setdefault((a_idx, p_idx), (path, f"{loc}.qas"))
                    ids.append(None)
                    continue
                pid = f"{lang}:{a_idx}-{p_idx}"
                context = get_str(para, "context", path, None, rejects, name=f"{loc}.context")
                if lang in corpus_langs and context is not None:
                    tables[f"{split}/corpus"].append(
                        {"pid": pid, "lang": lang, "title": title, "text": context.strip()})
                elif lang in corpus_langs:  # rejected (skip mode): no qrels may point at it
                    no_passage[pid] = (path, f"{loc}.context")
                q_ids: list[str | None] = []
                for q_idx, qa in enumerate(qas):
                    questions += 1
                    qloc = f"{loc}.qas[{q_idx}]"
                    qa_id = question = None
                    if not isinstance(qa, dict):
                        rejects.bad(path, None, qloc, "wrong type: expected an object, got "
                                    f"{type(qa).__name__}", qa)
                    else:
                        qa_id = get_id(qa, "id", path, None, rejects, name=f"{qloc}.id")
                        question = qa_id and get_str(qa, "question", path, None, rejects,
                                                     name=f"{qloc}.question")
                    if question is not None and not seen.new(qa_id, path, None, f"{qloc}.id",
                                                             rejects, qa, loc=qloc):
                        question = None
                    if question is None:
                        gone.setdefault((a_idx, p_idx, q_idx), (path, qloc))
                        q_ids.append(None)
                        continue
                    q_ids.append(qa_id)
                    kept.append((a_idx, p_idx, q_idx, qa_id, question.strip()))
                ids.append(q_ids)
            shape.append(ids)
        if questions == 0:
            raise no_rows(path, "no questions under 'data'")
        if structure is not None and not _xquad_parallel(shape, structure):
            raise DataError(f"{path}: articles/paragraphs/question ids are not parallel to the "
                            "other languages' files (XQuAD files must be fully parallel)")
        structure = _xquad_merged(structure, shape)
    for lang, (path, kept) in asked.items():  # a question rejected in any file goes in all
        for a_idx, p_idx, q_idx, qa_id, question in kept:
            bad = gone.get((a_idx,)) or gone.get((a_idx, p_idx)) or \
                gone.get((a_idx, p_idx, q_idx))
            if bad:
                rejects.bad(path, None, f"data[{a_idx}].paragraphs[{p_idx}].qas[{q_idx}]",
                            f"left out: {bad[1]} was rejected in {bad[0]} (XQuAD files are "
                            "parallel: a question goes from every language)")
                continue
            split = "test" if a_idx % test_mod == 0 else "train"
            qid = f"{lang}:{qa_id}"
            tables[f"{split}/queries"].append({"qid": qid, "lang": lang, "text": question})
            tables[f"{split}/qrels"].extend(
                {"qid": qid, "pid": f"{c}:{a_idx}-{p_idx}", "rel": 1} for c in corpus_langs)
    for split in ("train", "test"):  # skip mode: the qrels of a rejected paragraph go too
        rows = tables[f"{split}/qrels"]
        dropped = Counter(r["pid"] for r in rows if r["pid"] in no_passage)
        tables[f"{split}/qrels"] = [r for r in rows if r["pid"] not in no_passage]
        for pid, n in dropped.items():
            file, fld = no_passage[pid]
            rejects.bad(file, None, fld, f"no passage {pid}: its {n} qrels pair(s) are left out")
    return tables


# ---------------------------------------------------------------------------- XOR-TyDi / DPR


def _answers(value: Any, path: str, line: int, fld: str, rejects: Rejects) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        rejects.bad(path, line, fld, "wrong type: expected a list of strings", value)
        return None
    return None if _bad_item(value, path, line, fld, rejects) else value


def _bad_item(value: list[str], path: str, line: int | None, fld: str,
              rejects: Rejects) -> bool:
    """Whether a string of ``value`` is :func:`bad_unicode` (reported, naming its position)."""
    i = next((i for i, v in enumerate(value) if bad_unicode(v)), None)
    if i is not None:
        rejects.bad(path, line, fld, f"{BAD_UNICODE} at list position {i}", value)
    return i is not None


def read_xor_queries(path: str, rejects: Rejects | None = None,
                     query_langs: list[str] | None = None) -> Tables:
    """XOR-TyDi XOR-Retrieve queries: JSONL ``{"id", "lang", "question", "answers"}`` (also
    the MIA 2022 XOR files, same fields), only those in ``query_langs`` when given. ``lang``
    is stripped: the upstream train file has ``" ar"`` (a leading space) on every Arabic
    row. ``query_langs`` that select none of the file's queries are a ConfigError."""
    rejects = rejects or Rejects()
    queries, answers = [], []
    seen = FirstSeen()
    other: Counter[str] = Counter()  # languages left out by query_langs
    for n, obj in iter_jsonl(path, rejects):
        # one reason per rejected row: stop at its first defect
        qid = get_id(obj, "id", path, n, rejects)
        lang = qid and get_str(obj, "lang", path, n, rejects)
        text = lang and get_str(obj, "question", path, n, rejects)
        ans = _answers(obj.get("answers", []), path, n, "answers", rejects) if text else None
        if ans is None or not seen.new(qid, path, n, "id", rejects, obj):
            continue
        if query_langs and lang.strip() not in query_langs:
            other[lang.strip()] += 1
            continue
        queries.append({"qid": qid, "lang": lang.strip(), "text": text.strip()})
        answers.append({"qid": qid, "answers": ans})
    if other and not queries:
        found = ", ".join(f"{k} x {v}" for k, v in other.most_common(8))
        raise ConfigError(f"data.query_langs={query_langs} (--query-langs): no query of "
                          f"{path} is in these languages (it has {found})")
    return {"queries": queries, "answers": answers}


def read_qas(path: str, lang: str = "und", rejects: Rejects | None = None) -> Tables:
    """DPR's question-answer files (``nq-test.qas.csv``, ``trivia-test.qas.csv``, ...; the
    retrieval eval sets of DPR, read by ``dpr.data.retriever_data.CsvQASrc``): one question a
    row, ``question<TAB>answers`` with ``answers`` a Python list literal (``['Wilhelm Conrad
    Röntgen']``), CSV-quoted as DPR's ``csv.reader(f, delimiter="\\t")`` reads them (a
    quoted field may span lines), no header. ``.gz`` allowed. The answers are strings, matched
    as strings (CuratedTREC's regular-expression answers are not supported).

    Tables ``queries`` (qid: the row's first line number - 1, as DPR's rows have no id;
    lang: ``lang``) and ``answers``. A row without two columns (empty columns after them
    aside), an empty question, answers that are not a list of strings with a non-blank one,
    or a row the CSV reader cannot parse is a row defect, named by line and field.
    """
    rejects = rejects or Rejects()
    queries, answers = [], []
    lines: list[int] = []  # the numbers of the lines the CSV reader took for the row

    def feed() -> Iterator[str]:
        for n, line in _open_text_lines(path, rejects):
            lines.append(n)
            yield line + "\n"

    rows = csv.reader(feed(), delimiter="\t")
    read = 0
    while True:
        lines.clear()
        try:
            cells = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            rejects.bad(path, lines[0] if lines else None, None, f"unreadable CSV row: {e}")
            continue
        if not cells:  # a blank line
            continue
        n, raw = lines[0], "\t".join(cells)
        read += 1
        while len(cells) > 2 and not cells[-1]:
            cells.pop()
        if len(cells) != 2:
            rejects.bad(path, n, None, "expected 2 tab-separated columns (question, answers), "
                        f"got {len(cells)}", raw)
            continue
        question, literal = cells
        if not question.strip():
            rejects.bad(path, n, "question", "empty text", raw)
            continue
        try:
            ans = ast.literal_eval(literal.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            rejects.bad(path, n, "answers", f"not a Python list literal ({type(e).__name__}): "
                        f"{literal[:80]!r}", raw)
            continue
        ans = _answers(list(ans) if isinstance(ans, tuple) else ans, path, n, "answers",
                       rejects)
        if ans is None:
            continue
        if not any(a.strip() for a in ans):
            rejects.bad(path, n, "answers", "no answer (an eval question needs one)", raw)
            continue
        qid = str(n - 1)
        queries.append({"qid": qid, "lang": lang, "text": question.strip()})
        answers.append({"qid": qid, "answers": ans})
    if read == 0:
        raise no_rows(path)
    return {"queries": queries, "answers": answers}


PASSAGE_ID_KEYS = ("_id", "docid", "id")  # BEIR, Tevatron / Mr. TyDi, DPR / pyserini


def _passage_from_json(obj: dict, path: str, n: int, lang: str,
                       rejects: Rejects) -> tuple[str, dict[str, Any]] | None:
    """A JSONL passage: ``{"id"|"_id"|"docid", "title"?, "text"}`` (BEIR, DPR, Tevatron; a
    null title is ``""``) or pyserini's ``{"id", "contents"}``, where ``contents`` is
    ``title<TAB>text`` (DPR's psgs_w100 as pyserini JSONL) or, without a tab, the text
    alone. Returns (id key, row)."""
    key = next((k for k in PASSAGE_ID_KEYS if k in obj), "id")
    pid = get_id(obj, key, path, n, rejects)
    if pid is None:
        return None
    if "text" not in obj and "contents" in obj:
        contents = get_str(obj, "contents", path, n, rejects)
        if contents is None:
            return None
        title, tab, text = contents.partition("\t")
        if not tab:
            title, text = "", contents
        if not text.strip():
            rejects.bad(path, n, "contents", "empty text after the title and its tab", obj)
            return None
    else:
        text = get_str(obj, "text", path, n, rejects)
        title = (get_str(obj, "title", path, n, rejects, allow_empty=True)
                 if obj.get("title") is not None else "") if text else None  # null: none
        if title is None:
            return None
    row_lang = get_lang(obj, lang, path, n, rejects)
    if row_lang is None:
        return None
    return key, {"pid": pid, "lang": row_lang, "title": title, "text": text}


@dataclass
class Span:
    """A byte range ``[start, end)`` of an uncompressed text file (``end`` None: to its end):
    the lines that start in it. Counted as they are read: ``lines`` (all of them), ``rows``
    (those that are not blank, nor a TSV collection's header line) and ``pos``."""

    start: int = 0
    end: int | None = None
    lines: int = 0
    rows: int = 0
    pos: int = 0  # the end of the last line read
    header: bool = False  # a TSV's header line was read (and skipped)


TSV_COLUMNS = ["id", "text", "title"]  # psgs_w100's, when the file has no header line
TSV_ID_COLUMNS = ("id", "_id", "docid", "doc_id", "pid", "passage_id")  # a header's first


def tsv_cells(line: str) -> list[str]:
    """A TSV line's cells, CSV quoting undone (psgs_w100's ``"Aaron ""A"" is"``); malformed
    quoting (text after a closing quote, a quote left open) raises :class:`csv.Error`, as
    does a stray CR or a field over csv's limit (131,072 characters)."""
    try:
        return next(csv.reader((line,), delimiter="\t", strict=True))
    except csv.Error as e:
        raise csv.Error(str(e).replace("\t", "\\t")) from None  # a tab in the message


def tsv_header(cells: list[str]) -> list[str] | None:
    """A passage TSV's header line as column names: a line whose first column is named as an
    id (:data:`TSV_ID_COLUMNS`: ``id``, ``docid``, ...); None for a row. Only a file's first
    non-blank line is its header (else the columns are :data:`TSV_COLUMNS`); a header line
    later in the file (files concatenated) is a row defect."""
    return cells if cells and cells[0] in TSV_ID_COLUMNS else None


def iter_passages(path: str, lang: str = "en", rejects: Rejects | None = None,
                  unique: bool = True, span: Span | None = None,
                  header: list[str] | None = None,
                  ids: Callable[[str, int, str], None] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """Corpus rows of a passage collection, streamed (a generator: one line in memory).

    Formats, by suffix (``.gz`` allowed): ``.jsonl`` -- BEIR ``corpus.jsonl`` (``_id``),
    DPR / pyserini ``{"id", "title", "text"}`` or ``{"id", "contents": "title<TAB>text"}``,
    Tevatron / Mr. TyDi (``docid``); anything else -- DPR's ``psgs_w100.tsv``
    (``id<TAB>text<TAB>title``, CSV quoting, malformed quoting a row defect; the header line
    is optional, its first column ``id``, ``docid``, ... (:func:`tsv_header`)). A row's own
    ``lang`` field wins over ``lang``.

    ``unique``: a passage id seen earlier in the file is a defect, checked in memory (every
    id read so far, about 100 bytes each: 2 GB for the 21M passages of psgs_w100; ``qgscale
    data prepare`` checks a collection's ids in bounded memory instead,
    :mod:`qgscale.data.collection`); ``False`` does not check.

    ``span``: the rows of one byte range of the file (:class:`Span`; lines numbered within
    it), ``header`` the TSV's columns when the range does not hold the header line, ``ids``
    called with each yielded row's id, line and field (the id check of
    :mod:`qgscale.data.collection`, which reads a collection's ranges in parallel).
    """
    rejects = rejects or Rejects()
    seen = FirstSeen("passage id") if unique else None

    def new(pid: str, n: int, fld: str | None, raw: Any) -> bool:
        keep = seen is None or seen.new(pid, path, n, fld, rejects, raw)
        if keep and ids is not None:  # a row that is yielded
            ids(pid, n, fld or "id")
        return keep

    if JSONL_FILE.search(path):
        for n, obj in iter_jsonl(path, rejects, span):
            got = _passage_from_json(obj, path, n, lang, rejects)
            if got and new(got[1]["pid"], n, got[0], obj):
                yield got[1]
        return
    read = 0
    for n, line in _open_text_lines(path, rejects, span=span):
        if not line.strip() and "\t" not in line:  # blank; a line of tabs is a row of blanks
            continue
        try:
            cells = tsv_cells(line)
        except csv.Error as e:
            rejects.bad(path, n, None, f"malformed TSV line: {e}", line)
            continue
        named = tsv_header(cells)
        if header is None:
            header = named or TSV_COLUMNS
            if named:
                if span is not None:
                    span.header = True
                continue
        read += 1
        if span is not None:
            span.rows = read
        if named:
            rejects.bad(path, n, None, f"a header line ({', '.join(cells)}) inside the file "
                        "(files concatenated?), not a passage", line)
            continue
        if len(cells) != len(header):
            rejects.bad(path, n, None, f"expected {len(header)} tab-separated columns "
                        f"({', '.join(header)}), got {len(cells)}", line)
            continue
        obj = dict(zip(header, cells, strict=True))
        pid = get_str(obj, header[0], path, n, rejects)
        text = pid and get_str(obj, "text", path, n, rejects)
        if text is not None and new(pid, n, header[0], line):
            yield {"pid": pid, "lang": lang, "title": obj.get("title", ""), "text": text}
    if read == 0 and span is None:
        raise no_rows(path, "only a header" if header else "empty file")


def read_passages(path: str, lang: str = "en", rejects: Rejects | None = None) -> Tables:
    """A passage collection as a table (every row in memory): see :func:`iter_passages`,
    which streams."""
    return {"corpus": list(iter_passages(path, lang, rejects))}


# ---------------------------------------------------------------------------- DPR training


def iter_json_list(path: str, rejects: Rejects, chunk: int = 1 << 16
                   ) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line, index, object) for each element of a file holding one JSON list (DPR's
    ``nq-train.json``), streamed: one element in memory at a time, not the whole document.
    ``line`` is where the element starts. An element that is not an object, or that holds
    a key twice in an object (at any depth; the field named ``[index].key``), is a row defect;
    bad syntax, undecodable bytes, corrupt compressed data, a record over 256 MiB or a file without
    any element raise :class:`DataError` (a syntax error cannot be skipped: the reader
    cannot find where the next element starts)."""
    plain = json.JSONDecoder()  # finds the end of a record with a key twice
    ws = re.compile(r"[ \t\n\r]*")
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf, pos, base_line, lines_read, eof, start = "", 0, 1, 0, False, True

    with _open(path) as f:
        def more(size: int) -> bool:
            nonlocal buf, pos, base_line, eof, lines_read, start
            if eof:
                return False
            try:
                raw = f.read(size)
            except _READ_ERRORS as e:
                raise _read_error(path, e, lines_read) from None
            eof = not raw
            try:
                text = utf8.decode(raw, final=eof)
            except UnicodeDecodeError as e:
                line = base_line + buf.count("\n") + raw[: max(e.start, 0)].count(b"\n")
                raise DataError(f"{path}:{line}: undecodable bytes (not UTF-8): "
                                f"{e.reason}") from None
            if start and text:  # a byte-order mark, as JSONL's, is dropped
                start, text = False, text.removeprefix("\ufeff")
            lines_read += text.count("\n")
            base_line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:] + text, 0
            return not eof or bool(text)

        def line_at(p: int) -> int:
            return base_line + buf.count("\n", 0, p)

        def skip_ws() -> str:
            """The next non-blank character ('' at the end of the file)."""
            nonlocal pos
            while True:
                pos = ws.match(buf, pos).end()
                if pos < len(buf):
                    return buf[pos]
                if not more(chunk):
                    return ""

        def malformed(msg: str, p: int) -> DataError:
            return DataError(f"{path}:{line_at(p)}: malformed JSON: {msg}")

        first = skip_ws()
        if first == "":
            raise no_rows(path)
        if first != "[":
            raise DataError(f"{path}:{line_at(pos)}: expected a JSON list of records "
                            f"(DPR format), got {first!r}")
        pos += 1
        index = 0
        while True:
            c = skip_ws()
            if c == "]":
                pos += 1
                if skip_ws() != "":
                    raise malformed("extra data after the list", pos)
                break
            if index:
                if c != ",":
                    raise malformed("expected ',' or ']' between records"
                                    if c else "unexpected end of file", pos)
                pos += 1
                c = skip_ws()
            if c == "":
                raise malformed("unexpected end of file", pos)
            size, dup, decoder = chunk, None, _JSON
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except _DuplicateKey as e:
                    dup, decoder = e.key, plain
                except json.JSONDecodeError as e:
                    if len(buf) - pos > 256 << 20:
                        raise malformed(f"{e.msg} (or a record over 256 MiB)", e.pos) from None
                    size = max(size, len(buf) - pos)  # doubles: linear time for big records
                    if not more(size):
                        raise malformed(e.msg, e.pos) from None
            line = line_at(pos)
            pos = end
            if dup is not None:
                rejects.bad(path, line, f"[{index}].{dup}", DUPLICATE_KEY,
                            json.dumps(obj)[:2000])
            elif isinstance(obj, dict):
                yield line, index, obj
            else:
                rejects.bad(path, line, f"[{index}]", "expected a JSON object, got "
                            f"{type(obj).__name__}", json.dumps(obj)[:2000])
            index += 1
    if index == 0:
        raise no_rows(path, "an empty list")


DPR_QID_KEYS = ("id", "qid", "query_id", "question_id", "_id")
DPR_PID_KEYS = ("passage_id", "psg_id", "docid", "id", "_id")
DPR_POSITIVES = ("positive_ctxs", "positive_passages")  # DPR, Tevatron
DPR_NEGATIVES = ("hard_negative_ctxs", "negative_ctxs", "negative_passages")  # in this order


def _dpr_ctxs(obj: dict, keys: tuple[str, ...], loc: str, path: str, line: int,
              rejects: Rejects, required: bool, need_text: bool = True
              ) -> list[tuple[str, str | None, str | None]] | None:
    """``(pid, title, text)`` of the contexts under ``keys``; None after a reported defect.
    Without ``need_text`` a context may hold its id alone (title and text None)."""
    out: list[tuple[str, str | None, str | None]] = []
    present = [k for k in keys if k in obj]
    if required and not present:
        rejects.bad(path, line, f"{loc}{keys[0]}", "missing field", obj)
        return None
    for key in present:
        ctxs = obj[key]
        if not isinstance(ctxs, list):
            rejects.bad(path, line, f"{loc}{key}", "wrong type: expected a list of objects "
                        f"(title, text, passage_id), got {type(ctxs).__name__}", obj)
            return None
        for j, ctx in enumerate(ctxs):
            where = f"{loc}{key}[{j}]"
            if not isinstance(ctx, dict):
                rejects.bad(path, line, where, "wrong type: expected an object, got "
                            f"{type(ctx).__name__}", obj)
                return None
            id_key = next((k for k in DPR_PID_KEYS if k in ctx), None)
            if id_key is None:
                rejects.bad(path, line, f"{where}.passage_id", "missing field (no "
                            f"{' / '.join(DPR_PID_KEYS)})", obj)
                return None
            pid = get_id(ctx, id_key, path, line, rejects, name=f"{where}.{id_key}")
            if pid and not need_text and _no_text(ctx.get("text")):
                out.append((pid, None, None))
                continue
            text = pid and get_str(ctx, "text", path, line, rejects, name=f"{where}.text")
            title = (get_str(ctx, "title", path, line, rejects, allow_empty=True,
                             name=f"{where}.title") if ctx.get("title") is not None else ""
                     ) if text else None
            if title is None:
                return None
            out.append((pid, title.strip(), text.strip()))
    if required and not out:
        rejects.bad(path, line, f"{loc}{present[0]}", "empty list (no positive passage)", obj)
        return None
    return out


def _no_text(text: Any) -> bool:
    return text is None or (isinstance(text, str) and not text.strip())


def dpr_records(path: str, rejects: Rejects) -> Iterator[tuple[int, int, str, dict]]:
    """``(line, index, loc, record)`` of a DPR / Tevatron file, in file order: ``.json(.gz)``
    is one JSON list, streamed record by record (``loc`` ``"[index]."`` prefixes a field
    name); ``.jsonl`` (:data:`JSONL_FILE`: plain, gz, bz2, xz) one record per line (``loc``
    ``""``, index = line - 1)."""
    if JSONL_FILE.search(path):
        for n, obj in iter_jsonl(path, rejects):
            yield n, n - 1, "", obj
    else:
        for n, i, obj in iter_json_list(path, rejects):
            yield n, i, f"[{i}].", obj


def read_dpr(path: str, lang: str = "und", rejects: Rejects | None = None,
             corpus: bool = True, passage_lang: str | None = None,
             positions: list[int] | None = None,
             digests: dict[str, int] | None = None) -> Tables:
    """DPR / Tevatron retriever training data: the format of DPR's ``nq-train.json`` and of
    the mDPR / XOR-TyDi training files.

    A record: ``{"question", "answers", "positive_ctxs", "negative_ctxs",
    "hard_negative_ctxs"}``, each context ``{"title", "text", "passage_id" | "psg_id"}``;
    Tevatron's ``{"query_id", "query", "positive_passages", "negative_passages"}`` with
    ``docid`` contexts is read too. ``.json(.gz)``: one JSON list, streamed record by record;
    ``.jsonl`` (plain, gz, bz2, xz): one record per line.

    Tables: ``queries`` (qid: the record's ``id`` / ``qid`` / ``query_id`` / ``question_id``,
    else its 0-based position: the index in the list, or for JSONL the line number - 1;
    lang: the record's ``lang`` stripped, else ``lang``), ``answers``, ``qrels`` (each
    positive, rel 1), ``examples`` (TRAIN_EXAMPLES: positives deduplicated in file order;
    negatives = hard negatives then negatives, without repeats and without the positives)
    and, with ``corpus``, ``corpus``: every inline passage once, at its first copy, in
    language ``passage_lang`` (default ``lang``; XOR-TyDi's passages are English whatever
    the question's language): a generator that reads the file a second time, so that the
    passages are streamed, not held. A record without a positive, or (with ``corpus``) with
    a passage id whose title or text differ from an earlier copy, is a row defect.

    ``corpus=False`` leaves the passages out (use the collection they come from, e.g.
    psgs_w100, instead: :func:`dpr_on_collection`); a context may then hold its id alone.
    ``positions``, if given, gets each kept record's 0-based position in the file (one per
    ``examples`` row); ``digests`` each named passage's :func:`passage_digest` of its first
    inline copy with text (0 if none has).

    Memory: the query tables, and (with ``corpus``) a digest and the id per distinct
    passage, to check copies (about 150 bytes; the passages' texts are never held).
    """
    rejects = rejects or Rejects()
    tables: Tables = {"queries": [], "answers": [], "qrels": [], "examples": []}
    kept: list[int] = [] if positions is None else positions
    seen_q = FirstSeen("question id")
    first: dict[str, tuple[int, int]] = {}  # pid -> (digest, record index) of its 1st copy
    for n, i, loc, obj in dpr_records(path, rejects):
        q_key = next((k for k in ("question", "query") if k in obj), "question")
        id_key = next((k for k in DPR_QID_KEYS if k in obj), None)
        qid = get_id(obj, id_key, path, n, rejects, name=loc + id_key) if id_key else str(i)
        text = qid and get_str(obj, q_key, path, n, rejects, name=loc + q_key)
        row_lang = text and get_lang(obj, lang, path, n, rejects, name=loc + "lang")
        ans = (_answers(obj.get("answers", []), path, n, loc + "answers", rejects)
               if row_lang else None)
        pos = (_dpr_ctxs(obj, DPR_POSITIVES, loc, path, n, rejects, required=True,
                         need_text=corpus) if ans is not None else None)
        neg = (_dpr_ctxs(obj, DPR_NEGATIVES, loc, path, n, rejects, required=False,
                         need_text=corpus) if pos is not None else None)
        if neg is None:
            continue
        new: dict[str, tuple[int, int]] = {}
        clash = None
        for pid, title, body in (pos + neg) if corpus else ():
            digest = passage_digest(title, body)
            copy = first.get(pid) or new.get(pid)
            if copy is None:
                new[pid] = (digest, i)
            elif copy[0] != digest:
                clash = (pid, f"line {copy[1] + 1}" if not loc else f"[{copy[1]}]")
                break
        if clash:
            rejects.bad(path, n, f"{loc}passage_id", f"passage {clash[0]!r} has a different "
                        f"title or text than its first copy (at {clash[1]})", obj)
            continue
        # a positional qid may collide with another record's explicit one
        if not seen_q.new(qid, path, n, loc + (id_key or "(position: no id field)"), rejects,
                          obj):
            continue
        first.update(new)
        pos_pids = list(dict.fromkeys(p for p, _, _ in pos))
        positives = set(pos_pids)
        neg_pids = [p for p in dict.fromkeys(p for p, _, _ in neg) if p not in positives]
        tables["queries"].append({"qid": qid, "lang": row_lang, "text": text.strip()})
        tables["answers"].append({"qid": qid, "answers": ans})
        tables["qrels"].extend({"qid": qid, "pid": p, "rel": 1} for p in pos_pids)
        tables["examples"].append({"qid": qid, "pos_pids": pos_pids, "neg_pids": neg_pids})
        kept.append(i)
        if digests is not None:
            for pid, title, body in pos + neg:
                if not digests.get(pid):  # the first copy with its text
                    digests[pid] = 0 if body is None else passage_digest(title, body)
    if corpus:
        tables["corpus"] = _inline_passages(path, kept, first, passage_lang or lang)
    return tables


def _inline_passages(path: str, kept: list[int], first: dict[str, Any], lang: str
                     ) -> Iterator[dict[str, Any]]:
    """The second read of a DPR file: each inline passage of the ``kept`` records (their
    positions) once, at its first copy (``first``: each passage's first copy, popped as it
    is yielded), in file order."""
    want = set(kept)
    quiet = Rejects("skip")  # the first read reported each defect; these records have none
    for n, i, loc, obj in dpr_records(path, quiet):
        if i not in want:
            continue
        for keys in (DPR_POSITIVES, DPR_NEGATIVES):
            for pid, title, text in _dpr_ctxs(obj, keys, loc, path, n, quiet, False) or []:
                if first.pop(pid, None) is not None:
                    yield {"pid": pid, "lang": lang, "title": title, "text": text}
    if first:
        raise DataError(f"{path}: {len(first)} passages of the first read not found again "
                        f"(first: {next(iter(first))!r}): did the file change?")


def passage_digest(title: str, text: str) -> int:
    """An 8-byte digest (nonzero) of a passage's title and text with their whitespace runs
    made single spaces: tells copies apart, not spacing."""
    norm = f"{' '.join(title.split())}\t{' '.join(text.split())}"
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little") or 1


def dpr_on_collection(path: str, collection: str, rows: Iterable[dict[str, Any]],
                      lang: str = "und", rejects: Rejects | None = None
                      ) -> dict[str, Iterator[dict[str, Any]]]:
    """The DPR file ``path`` (:func:`read_dpr`, its inline passages left out) over the
    passage collection ``collection`` (its corpus rows ``rows``, e.g. :func:`iter_passages`
    of psgs_w100: streamed, never held).

    Returns generators, ``corpus`` first: it passes the collection's rows through, crossing
    off the passages the file names and comparing the named ones' inline copies (where they
    have text) with the collection's (:func:`passage_digest`): once the collection is read,
    those that differ are logged as a warning (the collection's copy is the corpus), or, when
    they are more than half of those compared, raise in fail mode (the wrong collection).
    The other tables are checked when the first of them is read, after the corpus: a passage
    the collection lacks is a row defect of the record naming it (its line and context
    field, e.g. ``[3].hard_negative_ctxs[7].passage_id``). In skip mode, a record with a
    missing positive is left out of every table and a missing negative is left out of its
    example, each reported. Memory: the file's query tables and a digest per passage it
    names (about 70 bytes), never the collection.
    """
    return NamedPassages(path, collection, lang, rejects).streams(rows)


class NamedPassages:
    """The DPR file ``path`` (its tables, the passages it names with the :func:`passage_digest`
    of their inline copies) over the passage collection ``collection``: the passages are
    crossed off as the collection is read, in one stream (:meth:`streams`) or by its byte
    ranges (:meth:`crossed`, from :mod:`qgscale.data.collection`); then the other tables are
    checked (:meth:`checked`). See :func:`dpr_on_collection`."""

    def __init__(self, path: str, collection: str, lang: str = "und",
                 rejects: Rejects | None = None):
        self.path, self.collection = path, collection
        self.rejects = rejects or Rejects()
        self.positions: list[int] = []
        self.named: dict[str, int] = {}  # the passages not yet seen in the collection
        self.tables = read_dpr(path, lang, self.rejects, corpus=False,
                               positions=self.positions, digests=self.named)
        self.read = False
        self._fixed: tuple[set[str], dict[str, list[str]]] | None = None

    def streams(self, rows: Iterable[dict[str, Any]]) -> dict[str, Iterator[dict[str, Any]]]:
        """The corpus (``rows``, passed through as they are crossed off) first, then the
        other tables."""
        return {"corpus": self._cross_off(rows), **{k: self.checked(k) for k in self.tables}}

    def _cross_off(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        compared, other, first = 0, 0, None
        for row in rows:
            digest = self.named.pop(row["pid"], 0)
            if digest:
                compared += 1
                if digest != passage_digest(row["title"], row["text"]):
                    other, first = other + 1, first or row["pid"]
            yield row
        self.crossed(None, compared, other, first)

    def crossed(self, missing: Iterable[str] | None, compared: int, other: int,
                first: str | None) -> None:
        """The collection is read: ``missing`` the named passages it lacks (None: those not
        crossed off), ``compared`` the named ones with text whose first copy in it was
        compared, ``other`` those that differ (``first``: the first of them in the
        collection)."""
        if missing is not None:
            self.named = {p: self.named[p] for p in missing}
        if other:
            msg = (f"{self.path}: {other} of the {compared} passages compared (those the file "
                   f"names with their text) have another title or text in the collection "
                   f"{self.collection} (first: {first!r})")
            if 2 * other > compared and self.rejects.mode != "skip":
                raise DataError(f"{msg}: is it the collection the file's passage ids come "
                                "from? (with on_error skip: a warning, the collection's "
                                "copies kept)")
            log.warning("%s; the collection's copies are the corpus", msg)
        self.read = True

    def fixed(self) -> tuple[set[str], dict[str, list[str]]]:
        """The qids left out, and the qids whose negatives lose some (-> the lost ones)."""
        if self._fixed is None:
            if not self.read:
                raise RuntimeError("read the corpus before the other DPR tables")
            self._fixed = _check_named(self.path, self.collection, self.tables["examples"],
                                       self.positions, self.named, self.rejects)
            self.named.clear()
        return self._fixed

    def checked(self, kind: str) -> Iterator[dict[str, Any]]:
        """The rows of table ``kind`` left once the named passages the collection lacks
        are reported (:func:`_check_named`)."""
        drop, lost = self.fixed()
        for r in self.tables[kind]:
            if r["qid"] in drop:
                continue
            if kind == "examples" and r["qid"] in lost:
                gone = set(lost[r["qid"]])
                r = {**r, "neg_pids": [p for p in r["neg_pids"] if p not in gone]}
            yield r


def _check_named(path: str, collection: str, examples: list[dict[str, Any]],
                 positions: list[int], missing: Mapping[str, Any], rejects: Rejects
                 ) -> tuple[set[str], dict[str, list[str]]]:
    """Report each record of ``examples`` (at ``positions`` of ``path``, re-read on this path
    only) that names a passage in ``missing``, in file order: a missing positive rejects
    the record (its qid is returned to be left out), missing negatives are left out of its
    example (qid -> them). Raises in fail mode, at the first."""
    drop: dict[int, str] = {}
    lost: dict[int, tuple[str, list[str]]] = {}
    for k, ex in enumerate(examples):
        if any(p in missing for p in ex["pos_pids"]):
            drop[positions[k]] = ex["qid"]
        elif gone := [p for p in ex["neg_pids"] if p in missing]:
            lost[positions[k]] = (ex["qid"], gone)
    if not drop and not lost:
        return set(), {}
    hint = (" (or its row there was rejected: see the rejected rows)"
            if any(f == collection or f.startswith(collection.rstrip("/") + "/")
                   for f in rejects.files) else "")
    totals = f"missing in all: {len(missing)} passages, named by {len(drop) + len(lost)} records"
    reported = 0
    for n, i, loc, obj in dpr_records(path, Rejects("skip")):  # reported by the first read
        if i not in drop and i not in lost:
            continue
        hit = _first_named(obj, DPR_POSITIVES if i in drop else DPR_NEGATIVES, loc, path, n,
                           missing)
        if hit is None:
            continue
        fld, pid = hit
        n_lost = len(lost[i][1]) if i in lost else 0
        what = (f"positive passage {pid!r} is" if i in drop else
                f"negative passage {pid!r} is" if n_lost == 1 else
                f"{n_lost} negative passages ({pid!r}, ...) are")
        done = ("" if rejects.mode != "skip" else ": the record is left out" if i in drop
                else ": left out of the example")
        rejects.bad(path, n, fld, f"{what} not in the passage collection "
                    f"{collection}{hint} ({totals}){done}", obj)
        reported += 1
        if reported == len(drop) + len(lost):
            break  # the rest of the file names no missing passage
    if reported != len(drop) + len(lost):
        raise DataError(f"{path}: {len(drop) + len(lost)} records name passages not in "
                        f"{collection}, {reported} found again: did the file change?")
    if len(drop) == len(examples):
        raise DataError(f"{path}: no record left: each names a positive passage not in the "
                        f"passage collection {collection} ({totals}): is it the collection "
                        "the file's passage ids come from?")
    return set(drop.values()), dict(lost.values())


def _first_named(obj: dict, keys: tuple[str, ...], loc: str, path: str, line: int,
                 pids: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(field, pid)`` of the first context of record ``obj`` under ``keys`` whose passage
    id is in ``pids``; None if none is."""
    for key in keys:
        ctxs = _dpr_ctxs(obj, (key,), loc, path, line, Rejects("skip"), False, False) or []
        for j, (pid, _, _) in enumerate(ctxs):
            if pid in pids:
                return f"{loc}{key}[{j}].{next(k for k in DPR_PID_KEYS if k in obj[key][j])}", pid
    return None


# ---------------------------------------------------------------------------- MKQA


def read_mkqa(path: str, query_langs: list[str] | None = None,
              rejects: Rejects | None = None, answer_lang: str | None = None) -> Tables:
    """MKQA JSONL(.gz): one record per example with ``queries`` and ``answers`` per language.

    qid ``{lang}:{example_id}``; answers are each answer's text and aliases (MKQA's R@kt uses
    them), in the query's language, or in ``answer_lang`` for every query (``"en"`` for an
    English corpus). Unanswerable questions (answers whose ``text`` is null) keep an empty
    answer list; a record without ``answers``, or without the answer language's list, is a
    row defect. A language of ``query_langs`` that no record has (``zh`` for ``zh_cn``) is a
    ConfigError.
    """
    rejects = rejects or Rejects()
    queries, answers = [], []
    seen = FirstSeen("example_id")
    langs: set[str] = set()  # of every record read
    for n, obj in iter_jsonl(path, rejects):
        ex_id = get_id(obj, "example_id", path, n, rejects)
        if ex_id is None:
            continue
        per_lang = obj.get("queries")
        if not isinstance(per_lang, dict) or not per_lang:
            rejects.bad(path, n, "queries", "missing field or not an object of language -> text",
                        obj)
            continue
        ans_by_lang = obj.get("answers")
        if not isinstance(ans_by_lang, dict):
            rejects.bad(path, n, "answers", "missing field" if ans_by_lang is None else
                        "wrong type: expected an object of language -> answers", obj)
            continue
        if not seen.new(ex_id, path, n, "example_id", rejects, obj):
            continue
        langs.update(per_lang)
        for lang in sorted(per_lang):
            if query_langs and lang not in query_langs:
                continue
            if bad_unicode(lang):
                rejects.bad(path, n, "queries", f"{BAD_UNICODE} in a language key", obj)
                continue
            text = get_str(per_lang, lang, path, n, rejects, name=f"queries.{lang}")
            texts = text and _mkqa_answers(ans_by_lang, answer_lang or lang, path, n, rejects)
            if texts is None:
                continue
            qid = f"{lang}:{ex_id}"
            queries.append({"qid": qid, "lang": lang, "text": text.strip()})
            answers.append({"qid": qid, "answers": texts})
    unknown = sorted(set(query_langs or ()) - langs) if langs else []
    if unknown:
        raise ConfigError(f"data.query_langs (--query-langs): {', '.join(unknown)} is not a "
                          f"language of {path} (it has {', '.join(sorted(langs))})")
    return {"queries": queries, "answers": answers}


def _mkqa_answers(by_lang: dict, lang: str, path: str, n: int,
                  rejects: Rejects) -> list[str] | None:
    """The texts and aliases of ``by_lang[lang]`` (a list of ``{"type", "text", "aliases"}``;
    ``text`` null for an unanswerable question); a missing or mistyped one is reported."""
    fld = f"answers.{lang}"
    items = by_lang.get(lang)
    ok = isinstance(items, list) and all(
        isinstance(a, dict) and isinstance(a.get("text"), str | type(None))
        and isinstance(a.get("aliases", []), list)
        and all(isinstance(t, str) for t in a.get("aliases", [])) for a in items)
    if not ok:
        rejects.bad(path, n, fld, "missing field" if items is None else "wrong type: expected "
                    'a list of {"text": string or null, "aliases": [string]}', by_lang)
        return None
    for i, a in enumerate(items):
        if a.get("text") and bad_unicode(a["text"]):
            rejects.bad(path, n, f"{fld}[{i}].text", BAD_UNICODE, by_lang)
            return None
        if _bad_item(a.get("aliases", []), path, n, f"{fld}[{i}].aliases", rejects):
            return None
    texts = [t for a in items for t in [a.get("text"), *a.get("aliases", [])] if t]
    return sorted(set(texts), key=texts.index)


MIA_MKQA_FILE = re.compile(r"^mkqa-(.+)\.jsonl(\.gz)?$")


def _listing(folder: str) -> tuple[Callable[[str], str], list[str]]:
    """(member -> URI, member paths) of a folder or a ``.zip`` archive (members via fsspec's
    ``zip://member::archive`` URLs)."""
    if re.search(r"\.zip$", folder):
        fs, p = fsspec.core.url_to_fs(folder)
        if not fs.exists(p):
            raise MissingInputError(f"{folder}: input file not found")
        zfs = fsspec.filesystem("zip", fo=folder)
        return (lambda m: f"zip://{m}::{folder}"), [m for m in zfs.find("")]
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(root):
        raise MissingInputError(f"{folder}: input folder not found")
    base = folder.rstrip("/")
    return (lambda m: f"{base}/{m}"), [os.path.relpath(m, root) for m in fs.find(root)]


def _hint_empty(rows: Iterator[tuple[int, dict[str, Any]]], lang: str
                ) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from rows
    except DataError as e:
        if ": no rows" not in str(e):
            raise
        raise DataError(f"{e}; leave language {lang!r} out with query_langs "
                        "(--query-langs)") from None


def read_mkqa_per_language(folder: str, query_langs: list[str] | None = None,
                           answer_lang: str | None = None,
                           rejects: Rejects | None = None) -> Tables:
    """MKQA as the MIA 2022 shared task ships it: one file per language,
    ``mkqa-{lang}.jsonl`` with rows ``{"id": "<example_id>_<lang>", "lang", "question",
    "answers"}``, in a folder or a ``.zip`` (``mkqa_dev.zip``).

    qid ``{lang}:{example_id}`` (as :func:`read_mkqa`): the id minus its ``_{lang}`` suffix,
    so one example has the same id in every language whatever the row order of each file
    (``lang`` may contain ``_``: ``zh_cn`` rows have ids ``..._zh_cn``). Answers are the
    row's own (in its language); with ``answer_lang`` (``"en"`` for an English corpus) they
    are that language's answers of the same example, joined on the id prefix -- a row whose
    example has no ``answer_lang`` row is a defect. An empty language file (MIA's test
    ``mkqa-pt.jsonl``) raises: leave the language out with ``query_langs``.
    """
    rejects = rejects or Rejects()
    uri, members = _listing(folder)
    files = {}
    for m in sorted(members):
        hit = MIA_MKQA_FILE.match(os.path.basename(m))
        if hit:
            if hit.group(1) in files:
                raise DataError(f"{folder}: two files for language {hit.group(1)!r}: "
                                f"{files[hit.group(1)]} and {m}")
            files[hit.group(1)] = m
    langs = sorted(files if not query_langs else set(query_langs))
    missing = [x for x in [*langs, answer_lang] if x and x not in files]
    if missing:
        raise MissingInputError(f"{folder}: no mkqa-{{lang}}.jsonl for {sorted(set(missing))} "
                                f"(found: {sorted(files)})")
    read_langs = sorted(set(langs) | ({answer_lang} if answer_lang else set()))
    rows: dict[str, list[tuple[str, int, str, str, list[str]]]] = {}
    for lang in read_langs:
        path = uri(files[lang])
        seen = FirstSeen("example id")
        rows[lang] = []
        for n, obj in _hint_empty(iter_jsonl(path, rejects), lang):
            rid = get_id(obj, "id", path, n, rejects)
            row_lang = rid and get_str(obj, "lang", path, n, rejects)
            text = row_lang and get_str(obj, "question", path, n, rejects)
            ans = _answers(obj.get("answers", []), path, n, "answers", rejects) if text else None
            if ans is None:
                continue
            if row_lang.strip() != lang:
                rejects.bad(path, n, "lang", f"{row_lang!r} in the file of language {lang!r}",
                            obj)
                continue
            if not rid.endswith(f"_{lang}") or len(rid) == len(lang) + 1:
                rejects.bad(path, n, "id", f"{rid!r} does not end with '_{lang}' "
                            "(<example_id>_<lang>)", obj)
                continue
            ex_id = rid[: -len(lang) - 1]
            if seen.new(ex_id, path, n, "id", rejects, obj):
                rows[lang].append((path, n, ex_id, text.strip(), ans))
    joined = {ex: ans for _, _, ex, _, ans in rows.get(answer_lang, [])} if answer_lang else {}
    queries, answers = [], []
    for lang in langs:
        for path, n, ex_id, text, ans in rows[lang]:
            if answer_lang:
                if ex_id not in joined:
                    rejects.bad(path, n, "id", f"example {ex_id!r} has no {answer_lang!r} row "
                                f"in {uri(files[answer_lang])} (joined on the id "
                                "prefix)")
                    continue
                ans = joined[ex_id]
            qid = f"{lang}:{ex_id}"
            queries.append({"qid": qid, "lang": lang, "text": text})
            answers.append({"qid": qid, "answers": ans})
    return {"queries": queries, "answers": answers}


# ---------------------------------------------------------------------------- Tatoeba


def read_tatoeba(folder: str, langs: list[str] | None = None,
                 rejects: Rejects | None = None) -> Tables:
    """Tatoeba bitext (LASER v1 layout ``tatoeba.{x}-eng.{x|eng}``, plain or .gz).

    Queries are the non-English sentences (qid ``{x}:{i}``), the corpus their English sides
    (pid ``eng-{x}:{i}``), qrels the translation pairs.
    """
    rejects = rejects or Rejects()
    fs, root = fsspec.core.url_to_fs(folder)
    found = sorted({re.sub(r"\.gz$", "", os.path.basename(p)).split(".")[1]
                    for p in fs.ls(root, detail=False) if "tatoeba." in os.path.basename(p)})
    pairs = [p for p in found if p.endswith("-eng") and (not langs or p[:-4] in langs)]
    if not pairs:
        raise MissingInputError(f"{folder}: no tatoeba.X-eng files"
                                f"{' for ' + str(langs) if langs else ''}")
    queries, corpus, qrels = [], [], []
    for pair in pairs:
        x = pair[:-4]
        sides = {}
        for side in (x, "eng"):
            name = f"tatoeba.{pair}.{side}"
            path = next((f"{folder.rstrip('/')}/{n}" for n in (name, name + ".gz")
                         if fs.exists(f"{root}/{n}")), None)
            if path is None:
                raise MissingInputError(f"{folder}: {name} is missing (pairs need both sides)")
            # undecodable lines stay in place (None), so that the two sides pair by line
            sides[side] = list(_open_text_lines(path, rejects, keep_bad=True))
            sides[side + "_path"] = path
            if not any(t and t.strip() for _, t in sides[side]):
                raise no_rows(path)
        if len(sides[x]) != len(sides["eng"]):
            raise DataError(f"{sides[x + '_path']}: {len(sides[x])} lines but "
                            f"{sides['eng_path']} has {len(sides['eng'])}: sides must align")
        for (n, src), (_, eng) in zip(sides[x], sides["eng"], strict=True):
            if src is None or eng is None:  # reported; its pair goes with it, reported too
                path, other = ((sides["eng_path"], sides[x + "_path"]) if src is None else
                               (sides[x + "_path"], sides["eng_path"]))
                if (src, eng) != (None, None):
                    rejects.bad(path, n, "text", f"its pair, line {n} of {other}, was "
                                "rejected (undecodable bytes)", src or eng)
                continue
            if not src.strip():
                rejects.bad(sides[x + "_path"], n, "text", "empty text")
                continue
            if not eng.strip():
                rejects.bad(sides["eng_path"], n, "text", "empty text")
                continue
            qid, pid = f"{x}:{n - 1}", f"eng-{x}:{n - 1}"
            queries.append({"qid": qid, "lang": x, "text": src.strip()})
            corpus.append({"pid": pid, "lang": "eng", "title": "", "text": eng.strip()})
            qrels.append({"qid": qid, "pid": pid, "rel": 1})
    return {"queries": queries, "corpus": corpus, "qrels": qrels}


# ---------------------------------------------------------------------------- BEIR / MIRACL


def read_qrels_tsv(path: str, rejects: Rejects | None = None) -> list[dict[str, Any]]:
    """BEIR qrels TSV: ``query-id<TAB>corpus-id<TAB>score`` with a header line (TREC
    ``qid 0 pid rel`` lines are accepted too)."""
    return [row for _, row in _iter_qrels_tsv(path, rejects or Rejects())]


QREL_SCORE = re.compile(r"-?[0-9]+")  # ASCII digits only


def _iter_qrels_tsv(path: str, rejects: Rejects) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of :func:`read_qrels_tsv`."""
    seen = FirstSeen("(query-id, corpus-id)")
    read = header = 0
    for n, line in _open_text_lines(path, rejects):
        cells = line.split("\t") if "\t" in line else line.split()
        if not line.strip():
            continue
        if n == 1 and cells[0] in ("query-id", "qid", "query_id"):
            header = 1
            continue
        read += 1
        if len(cells) == 4:
            cells = [cells[0], cells[2], cells[3]]
        if len(cells) != 3:
            rejects.bad(path, n, None, f"expected 3 columns (query-id, corpus-id, score), "
                        f"got {len(cells)}", line)
            continue
        if not QREL_SCORE.fullmatch(cells[2]):  # int() takes "1_0" (10), " 1", "١" (1)
            rejects.bad(path, n, "score", f"wrong type: expected an integer, got {cells[2]!r}",
                        line)
            continue
        rel = int(cells[2])
        if problem := _number_problem(rel, pa.int32()):  # the qrels' rel column
            rejects.bad(path, n, "score", problem, line)
            continue
        if not cells[0] or not cells[1]:
            rejects.bad(path, n, "query-id" if not cells[0] else "corpus-id", "empty id", line)
            continue
        if not seen.new((cells[0], cells[1]), path, n, None, rejects, line):
            continue
        yield n, {"qid": cells[0], "pid": cells[1], "rel": rel}
    if read == 0:
        raise no_rows(path, "only a header" if header else "empty file")


def beir_file(folder: str, name: str) -> str:
    """``folder/name`` of a BEIR folder, or its ``.gz``; a missing one is an error."""
    fs, root = fsspec.core.url_to_fs(folder)
    for n in (name, name + ".gz"):
        if fs.exists(f"{root}/{n}"):
            return f"{folder.rstrip('/')}/{n}"
    raise MissingInputError(f"{folder}: {name} is missing")


def read_beir(folder: str, lang: str = "und", rejects: Rejects | None = None,
              stream: bool = False, unique: bool = True, corpus: bool = True) -> Tables:
    """A BEIR/MIRACL folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``.
    With ``stream`` the corpus is a generator (:func:`iter_passages`, which takes
    ``unique``), read while it is written; queries and qrels are read at once. ``corpus``
    False: without the corpus (read in parallel by :mod:`qgscale.data.collection`)."""
    rejects = rejects or Rejects()
    fs, root = fsspec.core.url_to_fs(folder)
    base = folder.rstrip("/")
    tables: Tables = {}
    if corpus:
        passages = iter_passages(beir_file(folder, "corpus.jsonl"), lang, rejects, unique)
        tables["corpus"] = passages if stream else list(passages)
    queries = []
    qpath = beir_file(folder, "queries.jsonl")
    seen = FirstSeen("query id")
    for n, obj in iter_jsonl(qpath, rejects):
        key = "_id" if "_id" in obj else "id"
        qid = get_id(obj, key, qpath, n, rejects)
        text = qid and get_str(obj, "text", qpath, n, rejects)
        q_lang = text and get_lang(obj, lang, qpath, n, rejects)
        if q_lang and seen.new(qid, qpath, n, key, rejects, obj):
            queries.append({"qid": qid, "lang": q_lang, "text": text.strip()})
    qrel_files = sorted(p for p in fs.ls(f"{root}/qrels", detail=False)
                        if re.search(r"\.tsv(\.gz)?$", p)) if fs.exists(f"{root}/qrels") else []
    if not qrel_files:
        raise MissingInputError(f"{folder}: no qrels/*.tsv")
    split_of: dict[str, tuple[str, str, int]] = {}  # qid -> (split, file, line of 1st qrel)
    file_of: dict[str, str] = {}  # split -> its qrels file
    for p in qrel_files:
        split = os.path.basename(p).split(".")[0]
        path = f"{base}/qrels/{os.path.basename(p)}"
        if split in file_of:  # test.tsv and test.small.tsv (or test.tsv.gz): which one?
            raise DataError(f"{path}: a second qrels file of split {split!r} (the first: "
                            f"{file_of[split]}); keep one file per split in {base}/qrels")
        file_of[split] = path
        rows = []
        for n, r in _iter_qrels_tsv(path, rejects):
            first = split_of.setdefault(r["qid"], (split, path, n))
            if first[0] == split:
                rows.append(r)
            else:  # one query in two splits: its judgements would leak across them
                rejects.bad(path, n, "query-id", f"query {r['qid']!r} is judged in split "
                            f"{first[0]!r} too ({first[1]}:{first[2]})", r)
        tables[f"{split}/qrels"] = rows
    for q in queries:
        split = split_of.get(q["qid"], ("unjudged",))[0]
        tables.setdefault(f"{split}/queries", []).append(q)
    return tables


# ---------------------------------------------------------------------------- canonical JSONL


# The fields that identify a row of each canonical kind: a second row with the same values is
# a duplicate. (Training examples and generated queries may repeat a qid/pid.)
UNIQUE_KEYS = {"corpus": ("pid",), "queries": ("qid",), "answers": ("qid",),
               "candidates": ("qid",), "qrels": ("qid", "pid"), "scores": ("qid", "pid")}


def _number_problem(value: Any, typ: pa.DataType) -> str | None:
    """Why ``value`` (parsed JSON) cannot be stored as ``typ`` (an integer or float type):
    not a number, a float for an integer, out of the type's range, NaN or an infinity (JSON
    parsers read ``NaN``, ``Infinity`` and ``1e400``); None when it can."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        want = "integer" if pa.types.is_integer(typ) else "number"
        return f"wrong type: expected {want}, got {type(value).__name__}"
    if pa.types.is_integer(typ):
        if not isinstance(value, int):
            return f"wrong type: expected integer, got {type(value).__name__}"
        bits = typ.bit_width - 1
        if not -(1 << bits) <= value < (1 << bits):
            return f"{value} is out of range for {typ}"
        return None
    if not math.isfinite(value) or (typ.bit_width == 32 and abs(value) > 3.4028234e38):
        return f"{value} is not a finite {typ} number"
    return None


def read_canonical_jsonl(path: str, kind: str, rejects: Rejects | None = None) -> Tables:
    """Import JSONL rows already in a canonical format (every row in memory): see
    :func:`iter_canonical_jsonl`, which streams."""
    return {kind: list(iter_canonical_jsonl(path, kind, rejects))}


def _row_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, reason)`` of a canonical row whose fields disagree: a language with
    surrounding spaces, a pid twice in one list, a pid both positive and negative, scores not
    one per candidate pid; None when they agree."""
    if "lang" in row and row["lang"] != row["lang"].strip():
        return "lang", "surrounding whitespace"
    for name in ("pids", "pos_pids", "neg_pids"):
        pids = row.get(name) or []
        if len(set(pids)) < len(pids):
            twice = next(p for i, p in enumerate(pids) if p in pids[:i])
            return name, f"pid {twice!r} twice"
    both = set(row.get("pos_pids") or ()) & set(row.get("neg_pids") or ())
    if both:
        return "neg_pids", f"pid {min(both)!r} is also a positive"
    if row.get("scores") is not None and len(row["scores"]) != len(row.get("pids") or []):
        return "scores", f"{len(row['scores'])} scores for {len(row.get('pids') or [])} pids"
    return None


def iter_canonical_jsonl(path: str, kind: str, rejects: Rejects | None = None,
                         unique: bool = True, span: Span | None = None,
                         ids: Callable[[str, int, str], None] | None = None
                         ) -> Iterator[dict[str, Any]]:
    """JSONL rows already in a canonical format (``corpus``, ``queries``, ...), streamed (one
    line in memory); a field the kind does not have (a misspelt ``Title``) is a row defect,
    not left out, and so are rows whose fields disagree (:func:`_row_problem`). ``unique``: a
    row whose key (pid, qid, (qid, pid)) an earlier row had is a defect, checked in memory
    (the keys read so far). ``span``: one byte range of the file (:class:`Span`, as
    :func:`iter_passages`); ``ids``: called with each corpus row's ``(pid, line, "pid")``
    before it is yielded (``qgscale data prepare`` reads a corpus in byte
    ranges and checks its pids in bounded memory: :mod:`qgscale.data.collection`)."""
    rejects = rejects or Rejects()
    schema = SCHEMAS[kind]
    keys = UNIQUE_KEYS.get(kind, ())
    seen = FirstSeen("id" if len(keys) == 1 else f"({', '.join(keys)})") \
        if keys and unique else None
    for n, obj in iter_jsonl(path, rejects, span):
        unknown = sorted(set(obj) - set(schema.names))
        if unknown:
            rejects.bad(path, n, unknown[0], f"unknown field for {kind} rows (fields: "
                        f"{', '.join(schema.names)})", obj)
            continue
        row, ok = {}, True
        for f in schema:
            value = obj.get(f.name, _MISSING)
            nullable = f.name in ("scores", "title", "neg_pids")
            if value is _MISSING or value is None:
                if nullable:
                    row[f.name] = "" if f.name == "title" else None
                    continue
                rejects.bad(path, n, f.name, "missing field", obj)
                ok = False
                break
            if pa.types.is_string(f.type):
                value = get_str(obj, f.name, path, n, rejects, allow_empty=f.name == "title")
                ok = value is not None
            elif pa.types.is_integer(f.type) or pa.types.is_floating(f.type):
                problem = _number_problem(value, f.type)
                if problem:
                    rejects.bad(path, n, f.name, problem, obj)
                    ok = False
            elif pa.types.is_list(f.type):
                item = f.type.value_type
                want = str if pa.types.is_string(item) else (int, float)
                problems = [] if isinstance(value, list) and all(
                    isinstance(v, want) and not isinstance(v, bool) for v in value) else [
                    f"wrong type: expected a list of {item}"]
                if not problems and want is str:
                    problems = [f"empty string at list position {i}" if not v.strip() else
                                f"{BAD_UNICODE} at list position {i}"
                                for i, v in enumerate(value)
                                if not v.strip() or bad_unicode(v)]
                elif not problems:
                    problems = [f"list position {i}: {p}" for i, v in enumerate(value)
                                if (p := _number_problem(v, item))]
                if not problems and not value and f.name in ("pos_pids", "pids"):
                    problems = ["empty list"]
                if problems:
                    rejects.bad(path, n, f.name, problems[0], obj)
                    ok = False
            if not ok:
                break
            row[f.name] = value
        if ok:
            problem = _row_problem(row)
            if problem:
                rejects.bad(path, n, *problem, obj)
                ok = False
        if ok and seen is not None:
            key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
            ok = seen.new(key, path, n, keys[0] if len(keys) == 1 else None, rejects, obj)
        if ok and ids is not None and keys == ("pid",):
            ids(row["pid"], n, "pid")
        if ok:
            yield row
