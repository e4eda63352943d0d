"""Readers that convert raw datasets into qgscale's canonical tables.

Every reader validates as it reads. A defect of a row (malformed JSON, a missing or empty
field, a wrong type, undecodable bytes, an id already seen earlier in the file) is reported
through :class:`Rejects`: by default it raises :class:`~qgscale.errors.DataError` naming file,
line and field; with ``on_error="skip"`` the row is kept aside with its reason (written to
``_rejected.jsonl``) and counted. Nothing is dropped silently. A defect of a whole file (an
empty file, corrupt or truncated gzip data, a missing file) always raises.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fsspec

from qgscale.data.schema import SCHEMAS
from qgscale.errors import DataError, MissingInputError

XQUAD_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]

Tables = dict[str, list[dict[str, Any]]]  # kind ("corpus", "train/queries", ...) -> rows


@dataclass
class Rejects:
    """Collects bad rows: raises at once in ``fail`` mode, records them in ``skip`` mode."""

    mode: str = "fail"
    rows: list[dict[str, Any]] = field(default_factory=list)

    def bad(self, file: str, line: int | None, fld: str | None, reason: str,
            raw: Any = None) -> None:
        where = f"{file}:{line}" if line is not None else file
        msg = f"{where}: field {fld!r}: {reason}" if fld else f"{where}: {reason}"
        if self.mode != "skip":
            raise DataError(msg)
        self.rows.append({"file": file, "line": line, "field": fld, "reason": reason,
                          "raw": raw if isinstance(raw, str | type(None)) else repr(raw)[:2000]})


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
        first = f"line {w0}" if isinstance(w0, int) else str(w0)
        if f0 != file:
            first = f"{f0}:{w0}" if isinstance(w0, int) else f"{f0} {w0}"
        rejects.bad(file, line, fld, f"duplicate {self.what} {key!r} (first at {first})", raw)
        return False


def no_rows(path: str, detail: str = "empty file") -> DataError:
    return DataError(f"{path}: no rows ({detail})")


_CORRUPT = (gzip.BadGzipFile, EOFError, zlib.error)  # bad or truncated compressed data


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
    return fsspec.open(path, "rb", compression="infer")


def _open_text_lines(path: str, rejects: Rejects) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) for a text file; gz by suffix; bad bytes are reported;
    corrupt or truncated gzip data raises :class:`DataError` with the last whole line read."""
    n = 0
    with _open(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _CORRUPT as e:
                raise _corrupt(path, e, n) from None
            n += 1
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                rejects.bad(path, n, None, f"undecodable bytes (not UTF-8): {e.reason} at "
                            f"byte {e.start}", raw.decode("utf-8", "replace"))


def iter_jsonl(path: str, rejects: Rejects) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL(.gz) file; a file without
    any non-blank line raises :class:`DataError` ('no rows')."""
    rows = 0
    for n, line in _open_text_lines(path, rejects):
        if not line.strip():
            continue
        rows += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rejects.bad(path, n, None, f"malformed JSON: {e.msg} (column {e.colno})", line)
            continue
        if not isinstance(obj, dict):
            rejects.bad(path, n, None, f"expected a JSON object, got {type(obj).__name__}", line)
            continue
        yield n, obj
    if rows == 0:
        raise no_rows(path)


def load_json(path: str) -> Any:
    """A whole JSON document (gz by suffix); bad bytes or syntax, corrupt gzip data or an
    empty file fail with file (and line)."""
    with _open(path) as f:
        try:
            raw = f.read()
        except _CORRUPT as e:
            raise _corrupt(path, e) from None
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


def get_str(obj: dict, key: str, path: str, line: int | None, rejects: Rejects,
            allow_empty: bool = False, name: str | None = None) -> str | None:
    """``obj[key]`` as a non-empty string, else report and return None."""
    value = obj.get(key, _MISSING)
    fld = name or key
    if value is _MISSING or value is None:
        rejects.bad(path, line, fld, "missing field", obj)
        return None
    if not isinstance(value, str):
        rejects.bad(path, line, fld, f"wrong type: expected string, got {type(value).__name__}",
                    obj)
        return None
    if not allow_empty and not value.strip():
        rejects.bad(path, line, fld, "empty text", obj)
        return None
    return value


def get_id(obj: dict, key: str, path: str, line: int | None, rejects: Rejects) -> str | None:
    """An identifier: a non-empty string, or an integer (converted to a string)."""
    value = obj.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return get_str(obj, key, path, line, rejects)


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


def read_xquad(folder: str, query_langs: list[str] | None = None,
               corpus_langs: list[str] | None = None, test_mod: int = 4,
               rejects: Rejects | None = None) -> Tables:
    """XQuAD (SQuAD v1.1 JSON, one file per language) as a cross-lingual benchmark.

    queries: each question per language, qid ``{lang}:{id}``; corpus: each paragraph per
    language, pid ``{lang}:{article}-{paragraph}``; qrels: a question -> its paragraph in every
    corpus language. Split by article: ``article_idx % test_mod == 0`` -> test, else train; the
    two splits share no article, so no test article ever reaches training data.
    """
    rejects = rejects or Rejects()
    query_langs = query_langs or XQUAD_LANGS
    corpus_langs = corpus_langs or XQUAD_LANGS
    tables: Tables = {f"{s}/{k}": [] for s in ("train", "test")
                      for k in ("corpus", "queries", "qrels")}
    structure: list[list[list[str]]] | None = None  # article -> paragraph -> question ids
    for lang in sorted(set(query_langs) | set(corpus_langs)):
        path = _xquad_file(folder, lang)
        doc = load_json(path)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise DataError(f"{path}: field 'data': missing or not a list (SQuAD v1.1 format)")
        shape = []
        seen = FirstSeen("question id")
        questions = 0
        for a_idx, article in enumerate(data):
            split = "test" if a_idx % test_mod == 0 else "train"
            title = str(article.get("title", "")).replace("_", " ")
            ids = []
            for p_idx, para in enumerate(article.get("paragraphs", [])):
                loc = f"data[{a_idx}].paragraphs[{p_idx}]"
                pid = f"{lang}:{a_idx}-{p_idx}"
                context = get_str(para, "context", path, None, rejects, name=f"{loc}.context")
                if lang in corpus_langs and context is not None:
                    tables[f"{split}/corpus"].append(
                        {"pid": pid, "lang": lang, "title": title, "text": context.strip()})
                q_ids = []
                for q_idx, qa in enumerate(para.get("qas", [])):
                    questions += 1
                    qloc = f"{loc}.qas[{q_idx}]"
                    qa_id = get_id(qa, "id", path, None, rejects)
                    question = qa_id and get_str(qa, "question", path, None, rejects,
                                                 name=f"{qloc}.question")
                    if qa_id is None or question is None:
                        continue
                    q_ids.append(qa_id)
                    if not seen.new(qa_id, path, None, f"{qloc}.id", rejects, qa, loc=qloc):
                        continue
                    if lang not in query_langs:
                        continue
                    qid = f"{lang}:{qa_id}"
                    tables[f"{split}/queries"].append(
                        {"qid": qid, "lang": lang, "text": question.strip()})
                    tables[f"{split}/qrels"].extend(
                        {"qid": qid, "pid": f"{c}:{a_idx}-{p_idx}", "rel": 1}
                        for c in corpus_langs)
                ids.append(q_ids)
            shape.append(ids)
        if questions == 0:
            raise no_rows(path, "no questions under 'data'")
        if structure is None:
            structure = shape
        elif shape != structure:
            raise DataError(f"{path}: articles/paragraphs/question ids are not parallel to the "
                            "other languages' files (XQuAD files must be fully parallel)")
    return tables


# ---------------------------------------------------------------------------- XOR-TyDi / DPR


def _answers(value: Any, path: str, line: int, fld: str, rejects: Rejects) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        rejects.bad(path, line, fld, "wrong type: expected a list of strings", value)
        return None
    return value


def read_xor_queries(path: str, rejects: Rejects | None = None) -> Tables:
    """XOR-TyDi XOR-Retrieve queries: JSONL ``{"id", "lang", "question", "answers"}``."""
    rejects = rejects or Rejects()
    queries, answers = [], []
    seen = FirstSeen()
    for n, obj in iter_jsonl(path, rejects):
        # one reason per rejected row: stop at its first defect
        qid = get_id(obj, "id", path, n, rejects)
        lang = qid and get_str(obj, "lang", path, n, rejects)
        text = lang and get_str(obj, "question", path, n, rejects)
        ans = _answers(obj.get("answers", []), path, n, "answers", rejects) if text else None
        if ans is None or not seen.new(qid, path, n, "id", rejects, obj):
            continue
        queries.append({"qid": qid, "lang": lang, "text": text.strip()})
        answers.append({"qid": qid, "answers": ans})
    return {"queries": queries, "answers": answers}


def read_passages(path: str, lang: str = "en", rejects: Rejects | None = None) -> Tables:
    """A DPR-style passage collection: TSV ``id<TAB>text<TAB>title`` (header) or JSONL
    ``{"id"|"_id", "title", "text"}``."""
    rejects = rejects or Rejects()
    rows = []
    seen = FirstSeen("passage id")
    if re.search(r"\.jsonl(\.gz)?$", path):
        for n, obj in iter_jsonl(path, rejects):
            key = "_id" if "_id" in obj else "id"
            pid = get_id(obj, key, path, n, rejects)
            text = pid and get_str(obj, "text", path, n, rejects)
            title = (get_str(obj, "title", path, n, rejects, allow_empty=True)
                     if "title" in obj else "") if text else None
            if title is not None and seen.new(pid, path, n, key, rejects, obj):
                rows.append({"pid": pid, "lang": obj.get("lang", lang), "title": title,
                             "text": text})
        return {"corpus": rows}
    header: list[str] | None = None
    read = 0
    for n, line in _open_text_lines(path, rejects):
        if not line.strip():
            continue
        cells = next(csv.reader(io.StringIO(line), delimiter="\t"))
        if header is None:
            header = cells if cells and cells[0] == "id" else ["id", "text", "title"]
            if cells and cells[0] == "id":
                continue
        read += 1
        if len(cells) != len(header):
            rejects.bad(path, n, None, f"expected {len(header)} tab-separated columns "
                        f"({', '.join(header)}), got {len(cells)}", line)
            continue
        obj = dict(zip(header, cells, strict=True))
        pid = get_str(obj, "id", path, n, rejects)
        text = pid and get_str(obj, "text", path, n, rejects)
        if text is not None and seen.new(pid, path, n, "id", rejects, line):
            rows.append({"pid": pid, "lang": lang, "title": obj.get("title", ""), "text": text})
    if read == 0:
        raise no_rows(path, "only a header" if header else "empty file")
    return {"corpus": rows}


# ---------------------------------------------------------------------------- MKQA


def read_mkqa(path: str, query_langs: list[str] | None = None,
              rejects: Rejects | None = None) -> Tables:
    """MKQA JSONL(.gz): one record per example with ``queries`` and ``answers`` per language.

    qid ``{lang}:{example_id}``; answers are each answer's text and aliases (MKQA's R@kt uses
    them). Answer-less (unanswerable) languages keep an empty answer list.
    """
    rejects = rejects or Rejects()
    queries, answers = [], []
    seen = FirstSeen("example_id")
    for n, obj in iter_jsonl(path, rejects):
        ex_id = get_id(obj, "example_id", path, n, rejects)
        if ex_id is None:
            continue
        per_lang = obj.get("queries")
        if not isinstance(per_lang, dict) or not per_lang:
            rejects.bad(path, n, "queries", "missing field or not an object of language -> text",
                        obj)
            continue
        ans_by_lang = obj.get("answers", {})
        if not isinstance(ans_by_lang, dict):
            rejects.bad(path, n, "answers", "wrong type: expected an object", obj)
            continue
        if not seen.new(ex_id, path, n, "example_id", rejects, obj):
            continue
        for lang in sorted(per_lang):
            if query_langs and lang not in query_langs:
                continue
            text = get_str(per_lang, lang, path, n, rejects, name=f"queries.{lang}")
            if text is None:
                continue
            texts: list[str] = []
            for a in ans_by_lang.get(lang) or []:
                if isinstance(a, dict):
                    texts.extend(t for t in [a.get("text"), *(a.get("aliases") or [])]
                                 if isinstance(t, str) and t)
            qid = f"{lang}:{ex_id}"
            queries.append({"qid": qid, "lang": lang, "text": text.strip()})
            answers.append({"qid": qid, "answers": sorted(set(texts), key=texts.index)})
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
            sides[side] = [(n, t) for n, t in _open_text_lines(path, rejects)]
            sides[side + "_path"] = path
            if not any(t.strip() for _, t in sides[side]):
                raise no_rows(path)
        if len(sides[x]) != len(sides["eng"]):
            raise DataError(f"{sides[x + '_path']}: {len(sides[x])} lines but "
                            f"{sides['eng_path']} has {len(sides['eng'])}: sides must align")
        for (n, src), (_, eng) in zip(sides[x], sides["eng"], strict=True):
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
    rejects = rejects or Rejects()
    rows = []
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
        try:
            rel = int(cells[2])
        except ValueError:
            rejects.bad(path, n, "score", f"wrong type: expected an integer, got {cells[2]!r}",
                        line)
            continue
        if not cells[0] or not cells[1]:
            rejects.bad(path, n, "query-id" if not cells[0] else "corpus-id", "empty id", line)
            continue
        if not seen.new((cells[0], cells[1]), path, n, None, rejects, line):
            continue
        rows.append({"qid": cells[0], "pid": cells[1], "rel": rel})
    if read == 0:
        raise no_rows(path, "only a header" if header else "empty file")
    return rows


def read_beir(folder: str, lang: str = "und", rejects: Rejects | None = None) -> Tables:
    """A BEIR/MIRACL folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``."""
    rejects = rejects or Rejects()
    fs, root = fsspec.core.url_to_fs(folder)
    base = folder.rstrip("/")

    def find(name: str) -> str:
        for n in (name, name + ".gz"):
            if fs.exists(f"{root}/{n}"):
                return f"{base}/{n}"
        raise MissingInputError(f"{folder}: {name} is missing")

    tables: Tables = dict(read_passages(find("corpus.jsonl"), lang, rejects))
    queries = []
    qpath = find("queries.jsonl")
    seen = FirstSeen("query id")
    for n, obj in iter_jsonl(qpath, rejects):
        key = "_id" if "_id" in obj else "id"
        qid = get_id(obj, key, qpath, n, rejects)
        text = qid and get_str(obj, "text", qpath, n, rejects)
        if text is not None and seen.new(qid, qpath, n, key, rejects, obj):
            queries.append({"qid": qid, "lang": obj.get("lang", lang), "text": text.strip()})
    qrel_files = sorted(p for p in fs.ls(f"{root}/qrels", detail=False)
                        if re.search(r"\.tsv(\.gz)?$", p)) if fs.exists(f"{root}/qrels") else []
    if not qrel_files:
        raise MissingInputError(f"{folder}: no qrels/*.tsv")
    split_of = {}
    for p in qrel_files:
        split = os.path.basename(p).split(".")[0]
        rows = read_qrels_tsv(f"{base}/qrels/{os.path.basename(p)}", rejects)
        tables[f"{split}/qrels"] = rows
        split_of.update({r["qid"]: split for r in rows})
    for q in queries:
        tables.setdefault(f"{split_of.get(q['qid'], 'unjudged')}/queries", []).append(q)
    return tables


# ---------------------------------------------------------------------------- canonical JSONL


# The fields that identify a row of each canonical kind: a second row with the same values is
# a duplicate. (Training examples and generated queries may repeat a qid/pid.)
UNIQUE_KEYS = {"corpus": ("pid",), "queries": ("qid",), "answers": ("qid",),
               "candidates": ("qid",), "qrels": ("qid", "pid"), "scores": ("qid", "pid")}


def read_canonical_jsonl(path: str, kind: str, rejects: Rejects | None = None) -> Tables:
    """Import JSONL rows already in a canonical format (``corpus``, ``queries``, ...)."""
    import pyarrow as pa

    rejects = rejects or Rejects()
    schema = SCHEMAS[kind]
    rows = []
    keys = UNIQUE_KEYS.get(kind, ())
    seen = FirstSeen("id" if len(keys) == 1 else f"({', '.join(keys)})")
    for n, obj in iter_jsonl(path, rejects):
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
                is_num = isinstance(value, int | float) and not isinstance(value, bool)
                if not is_num or (pa.types.is_integer(f.type) and not isinstance(value, int)):
                    want = "integer" if pa.types.is_integer(f.type) else "number"
                    rejects.bad(path, n, f.name, f"wrong type: expected {want}, got "
                                f"{type(value).__name__}", obj)
                    ok = False
            elif pa.types.is_list(f.type):
                item = f.type.value_type
                want = str if pa.types.is_string(item) else (int, float)
                if not isinstance(value, list) or not all(
                        isinstance(v, want) and not isinstance(v, bool) for v in value):
                    rejects.bad(path, n, f.name, f"wrong type: expected a list of {item}", obj)
                    ok = False
                elif not value and f.name in ("pos_pids", "pids"):
                    rejects.bad(path, n, f.name, "empty list", obj)
                    ok = False
            if not ok:
                break
            row[f.name] = value
        if ok and keys:
            key = row[keys[0]] if len(keys) == 1 else tuple(row[k] for k in keys)
            ok = seen.new(key, path, n, keys[0] if len(keys) == 1 else None, rejects, obj)
        if ok:
            rows.append(row)
    return {kind: rows}
