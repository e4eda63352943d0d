"""Arrow schemas of qgscale's canonical parquet formats (documented in the README)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

CORPUS = pa.schema([("pid", pa.string()), ("lang", pa.string()), ("title", pa.string()),
                    ("text", pa.string())])
QUERIES = pa.schema([("qid", pa.string()), ("lang", pa.string()), ("text", pa.string())])
QRELS = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("rel", pa.int32())])
TRAIN_EXAMPLES = pa.schema([("qid", pa.string()), ("pos_pids", pa.list_(pa.string())),
                            ("neg_pids", pa.list_(pa.string()))])
CANDIDATES = pa.schema([("qid", pa.string()), ("pids", pa.list_(pa.string())),
                        ("scores", pa.list_(pa.float32()))])
# Teacher outputs.
SCORES = pa.schema([("qid", pa.string()), ("pid", pa.string()), ("score", pa.float32()),
                    ("ntok", pa.int32())])
GENERATED = pa.schema([("pid", pa.string()), ("lang", pa.string()), ("query", pa.string()),
                       ("logprob", pa.float32())])
# Answers (for R@kt metrics on XOR-TyDi / MKQA).
ANSWERS = pa.schema([("qid", pa.string()), ("answers", pa.list_(pa.string()))])

SCHEMAS: dict[str, pa.Schema] = {
    "corpus": CORPUS, "queries": QUERIES, "qrels": QRELS, "train": TRAIN_EXAMPLES,
    "candidates": CANDIDATES, "scores": SCORES, "generated": GENERATED, "answers": ANSWERS,
    "examples": TRAIN_EXAMPLES,  # training examples of a prepared dataset (``--format dpr``)
}


def embeddings_schema(dim: int, dtype: str = "float32", lang: bool = True) -> pa.Schema:
    """Embedding shards: ``{pid, lang, vector}`` with a fixed-size list of ``dim`` floats
    (``lang``: the passage's language, carried into the index's id map; shards written
    before it was added lack it)."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([("pid", pa.string())] + ([("lang", pa.string())] if lang else [])
                     + [("vector", pa.list_(value, dim))])


def passage_text(title: str | None, text: str | None) -> str:
    """The text of a corpus row as every model sees it (student, index, teacher):
    ``"title text"``, or the text alone when there is no title."""
    title, text = (title or "").strip(), (text or "").strip()
    return f"{title} {text}" if title else text


def blank(col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Where a string column is null, empty or only whitespace (a boolean column)."""
    return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), True)
