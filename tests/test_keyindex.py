"""KeyIndex: a table found by a string key (exact matches, hash collisions included)."""

import pickle
import random

import numpy as np
import pyarrow as pa

from qgscale.data import keyindex
from qgscale.data.keyindex import KeyIndex


def _brute(keys: list, probe: list) -> list[tuple[int, int]]:
    return sorted((i, j) for i, p in enumerate(probe) for j, k in enumerate(keys)
                  if p is not None and p == k)


def _matches(ix: KeyIndex, probe: pa.ChunkedArray) -> list[tuple[int, int]]:
    """(probe row, built row) of every match."""
    rows, at = ix.find(probe)
    return sorted(zip(rows.tolist(), ix.table.column("row").take(pa.array(at)).to_pylist(),
                      strict=True))


def test_find_is_the_join_of_equal_keys():
    rng = random.Random(0)
    keys = [rng.choice([None, *(f"p{i}" for i in range(300))]) for _ in range(1000)]
    probe = [rng.choice([None, "", *(f"p{i}" for i in range(400))]) for _ in range(700)]
    ix = KeyIndex.build(pa.table({"pid": keys, "row": list(range(len(keys)))}), "pid")
    chunked = pa.chunked_array([probe[:123], probe[123:], []], pa.string())
    want = _brute(keys, probe)
    assert len(want) > 500 and _matches(ix, chunked) == want
    assert ix.contains(chunked).tolist() == [p is not None and p in keys for p in probe]
    back = pickle.loads(pickle.dumps(ix))  # what ray.put ships to the actors
    assert _matches(back, chunked) == want


def test_every_hash_colliding_still_matches_exactly(monkeypatch):
    """64-bit collisions cannot be caused for real here: every key hashes to 0."""
    monkeypatch.setattr(keyindex, "key_hashes", lambda a: np.zeros(len(a), np.uint64))
    keys = ["a", "b", "a", "c"]
    ix = KeyIndex.build(pa.table({"pid": keys, "row": [0, 1, 2, 3]}), "pid")
    probe = pa.chunked_array([["c", "x", "a"]])
    assert _matches(ix, probe) == [(0, 3), (2, 0), (2, 2)]
    assert ix.contains(probe).tolist() == [True, False, True]


def test_empty_sides():
    empty = KeyIndex.build(pa.array([], pa.string()), "pid")
    assert len(empty) == 0 and empty.contains(pa.array(["a"])).tolist() == [False]
    ix = KeyIndex.build(pa.array(["a"]), "pid")
    rows, at = ix.find(pa.array([], pa.string()))
    assert rows.size == at.size == 0
    assert ix.contains(pa.array(["b", "a"])).tolist() == [False, True]


def test_hashes_are_the_same_in_chunks(monkeypatch):
    from qgscale.data import pidfilter

    keys = pa.chunked_array([[f"k{i}" for i in range(10)], [None, "k3"]])
    whole = pidfilter.key_hashes(keys)
    monkeypatch.setattr(pidfilter, "CHUNK", 3)
    assert pidfilter.key_hashes(keys).tolist() == whole.tolist()
    assert whole[3] == whole[11] and len(set(whole[:10].tolist())) == 10


def test_scan_takes_any_form_of_the_pids(tmp_path):
    """A set with repeats, an Arrow array, a chunked column or a built index: the same rows."""
    from qgscale import storage
    from qgscale.data.corpus import scan
    from qgscale.data.schema import CORPUS

    rows = [{"pid": f"p{i}", "lang": "en", "title": "", "text": f"text {i}"} for i in range(9)]
    for s in range(3):
        storage.write_parquet(str(tmp_path / f"part-{s:05d}.parquet"),
                              pa.Table.from_pylist(rows[s * 3:s * 3 + 3], schema=CORPUS))
    want = ["p1", "p4", "p5", "p8"]
    asked = ["p8", "p1", "p4", "p5", "p1", "nope"]
    for pids in (asked, pa.array(asked), pa.chunked_array([asked[:2], asked[2:]]),
                 KeyIndex.of(asked)):
        got = [p for t in scan(str(tmp_path), pids, ("pid", "text")) for p in t["pid"].to_pylist()]
        assert got == want, type(pids)


def test_values_are_every_row_of_a_key_in_table_order():
    idx = KeyIndex.build(pa.table({"qid": ["a", "b", "a", "c", None], "v": [1, 2, 3, 4, 5]}),
                         "qid")
    assert idx.values(pa.array(["a", "z", "c", "a", None]), "v") == [[1, 3], [], [4], [1, 3], []]
