"""Prepare's duplicate passage ids (``qgscale.data.unique``): the same duplicates as the
in-memory check, both rows named, ``skip`` keeping the first copy, and the dropped rows kept
through a crash."""

from __future__ import annotations

import json
import random

import pytest

from qgscale import storage
from qgscale.data import readers
from qgscale.data.prepare import prepare, read
from qgscale.errors import DataError


def _ids(n: int, dups: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    ids = [f"p{i}" for i in range(n)]
    for _ in range(dups):  # a later copy of an earlier id, at a random place
        at = rng.randrange(1, len(ids))
        ids.insert(at, ids[rng.randrange(at)])
    return ids


def _in_memory(ids: list[str], file: str, first_line: int = 1) -> list[tuple]:
    seen, rejects = readers.FirstSeen("passage id"), readers.Rejects("skip")
    for n, k in enumerate(ids, first_line):
        seen.new(k, file, n, "id", rejects)
    return [(r["line"], r["reason"]) for r in rejects.rows]


def _tsv(tmp_path, ids):
    path = tmp_path / "psgs.tsv"
    path.write_text("id\ttext\ttitle\n" + "".join(f"{k}\tPassage {i}.\tT{i}\n"
                                                  for i, k in enumerate(ids)))
    return str(path)


def test_prepare_fails_on_the_first_duplicate_naming_both_lines(tmp_path):
    ids = ["a", "b", "c", "d", "e", "c", "f", "a"]  # c: lines 4 and 7, a: lines 2 and 9
    path = _tsv(tmp_path, ids)
    with pytest.raises(DataError, match=r"psgs.tsv:7: field 'id': duplicate passage id 'c' "
                                        r"\(first at line 4\)$"):
        prepare("passages", path, str(tmp_path / "out"), shard_rows=3)
    assert storage.read_manifest(str(tmp_path / "out" / "corpus")) is None  # no manifest


def test_prepare_skip_drops_later_copies_across_shards(tmp_path):
    ids = _ids(300, 25, seed=3)
    path = _tsv(tmp_path, ids)
    out = str(tmp_path / "out")
    summary = prepare("passages", path, out, on_error="skip", shard_rows=16)
    kept = storage.read_parquet(f"{out}/corpus").to_pylist()
    # the same rows, in the same order, as the in-memory check (first copy kept)
    want = read("passages", path, rejects=readers.Rejects("skip"))["corpus"]
    assert kept == want and len(kept) == 300
    rejected = [json.loads(x) for x in open(f"{out}/_rejected.jsonl", encoding="utf-8")]
    assert summary["rejected"] == len(rejected) == 25
    assert sorted((r["line"], r["reason"]) for r in rejected) == sorted(
        _in_memory(ids, path, first_line=2))  # line 1: the header
    for r in rejected:  # raw: the dropped row as read
        row = json.loads(r["raw"])
        assert row["pid"] in r["reason"] and row["text"] == f"Passage {r['line'] - 2}."
    m = storage.read_manifest(f"{out}/corpus")
    assert m["rows"] == 300 and sum(s["rows"] for s in m["shards"]) == 300
    # resumed: shards already deduplicated are not cut again
    again = prepare("passages", path, out, on_error="skip", shard_rows=16)
    assert again["rows"] == summary["rows"]
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want


def test_dropped_rows_survive_a_crash_between_a_shard_and_its_marker(tmp_path):
    """``drop_rows`` keeps the rows it drops in the marker before it rewrites the shard: a
    run that died after the shard (its old marker left) still reports them."""
    import pyarrow as pa

    from qgscale.data.unique import drop_rows

    writer = storage.ShardWriter(str(tmp_path / "c"), "h")
    table = pa.table({"pid": ["a", "b", "a", "c"], "text": ["1", "2", "3", "4"]})
    writer.write("part-00000", table)
    pre = storage.read_json(writer.marker_uri("part-00000"))
    raws = drop_rows(("part-00000", [2]), writer)
    assert json.loads(raws[0]) == {"pid": "a", "text": "3"}
    assert drop_rows(("part-00000", [2]), writer) == raws  # done: from the marker
    held = writer.markers()["part-00000"]  # every shard's marker, without its dropped rows
    assert "dropped_raw" not in held and held["rows"] == 3
    marker = storage.read_json(writer.marker_uri("part-00000"))
    assert marker["rows"] == 3 and marker["dropped"] == [2]
    # the crash: the shard rewritten, its marker the one written just before
    storage.write_json(writer.marker_uri("part-00000"), {**pre, "dropping": [2],
                                                        "dropped_raw": raws})
    assert drop_rows(("part-00000", [2]), writer) == raws
    assert storage.read_parquet(writer.shard_uri("part-00000")).column("pid").to_pylist() == [
        "a", "b", "c"]
