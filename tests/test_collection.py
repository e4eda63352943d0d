"""A passage collection prepared in byte-range units (``qgscale.data.collection``): the same
corpus rows, rejected rows and errors (with the file's line numbers) as one stream of the
file, on Ray tasks and on S3, and a re-run keeps the finished units."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random

import pyarrow as pa
import pytest

from qgscale import storage
from qgscale.data import collection, readers
from qgscale.data.collection import plan, write_collection
from qgscale.data.prepare import prepare
from qgscale.data.readers import passage_digest
from qgscale.errors import DataError


def _lines(data: bytes, cuts: list[int]) -> list[list[tuple[int, str | None]]]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".tsv") as f:
        f.write(data)
        f.flush()
        spans = [readers.Span(a, b) for a, b in zip([0, *cuts], [*cuts, None], strict=True)]
        got = [list(readers._open_text_lines(f.name, readers.Rejects("skip"), True, s))
               for s in spans]
        whole = list(readers._open_text_lines(f.name, readers.Rejects("skip"), True))
    assert [s.lines for s in spans] == [len(g) for g in got]
    return got, whole


@pytest.mark.parametrize("seed", range(40))
def test_spans_read_every_line_once(seed):
    """Cut anywhere (inside a line, between CR and LF, on a newline, twice at one byte),
    the spans' lines are the file's lines, each once, in order and numbered within spans."""
    rng = random.Random(seed)
    parts = ["\ufeff" if rng.random() < 0.3 else ""]
    for _ in range(rng.randrange(0, 30)):
        parts.append(rng.choice(["", "a", "ab\tc", "ä" * rng.randrange(1, 40), "\t"]) +
                     rng.choice(["\n", "\r\n", "\n\n"]))
    if rng.random() < 0.5:
        parts.append("no newline at the end")
    data = "".join(parts).encode()
    if rng.random() < 0.2:  # a bad byte: reported, kept as None (keep_bad)
        data = data[: len(data) // 2] + b"\xff" + data[len(data) // 2:]
    cuts = sorted(rng.randrange(0, len(data) + 1) for _ in range(rng.randrange(0, 6)))
    got, whole = _lines(data, cuts)
    assert [t for g in got for _, t in g] == [t for _, t in whole]
    assert all([n for n, _ in g] == list(range(1, len(g) + 1)) for g in got)


def _tsv(tmp_path, n=300, seed=0, bad=(), dups=0, header=True):
    rng = random.Random(seed)
    ids = [f"p{i}" for i in range(n)]
    for _ in range(dups):  # a later copy of an earlier id
        at = rng.randrange(1, len(ids))
        ids.insert(at, ids[rng.randrange(at)])
    lines = [f"{k}\t{'Passage ' * rng.randrange(1, 30)}{i}.\tT{i}\n" for i, k in enumerate(ids)]
    for at in bad:  # a row with two columns, and a row with empty text
        lines.insert(at, "broken\trow\n" if at % 2 else "empty\t \tT\n")
    path = tmp_path / "psgs.tsv"
    path.write_text(("id\ttext\ttitle\n" if header else "") + "".join(lines))
    return str(path)


def _one_stream(path, lang="en"):
    rejects = readers.Rejects("skip")
    rows = list(readers.iter_passages(path, lang, rejects))
    return rows, sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows)


def _collection(path, out, mode="skip", unit_bytes=1000, shard_rows=7, lang="en"):
    rejects = readers.Rejects(mode)
    m = write_collection(path, lang, f"{out}/corpus", f"{out}/_collection", "h", shard_rows,
                         rejects, unit_bytes=unit_bytes)
    return m, rejects


@pytest.mark.parametrize("header,small", [(True, ""), (False, ""), (True, "buckets"),
                                          (True, "passes")])
def test_units_give_the_rows_and_rejects_of_one_stream(tmp_path, monkeypatch, header, small):
    """``buckets``: ids packed 2 at a time and written every 4, in several buckets;
    ``passes``: one bucket (as a first line far longer than the rest makes it) holding 30
    times the ids a pass may hold, checked in passes."""
    settings = {"buckets": (("PACK_ROWS", 2), ("ID_FLUSH", 4), ("BUCKET_IDS", 40)),
                "passes": (("BUCKET_IDS", 10), ("MAX_BUCKETS", 1))}.get(small, ())
    for name, value in settings:
        monkeypatch.setattr(collection, name, value)
    path = _tsv(tmp_path, bad=(5, 120, 121, 250), dups=20, header=header)
    units, _, buckets = plan([path], 1000)
    assert len(units) > 20 and units[0].start == 0 and (buckets > 3) == (small == "buckets")
    if small == "buckets":  # ~328 lines: about 8 buckets of 40, from the first MiB's lines
        assert 6 <= buckets <= 12, buckets
    out = str(tmp_path / "out")
    m, rejects = _collection(path, out)
    want, want_rejects = _one_stream(path)
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
    assert m["rows"] == len(want) == 300
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects
    assert sum("duplicate passage id" in r[2] for r in want_rejects) == 20
    for r in rejects.rows:  # raw: the rejected line or row as read
        assert r["raw"].startswith(("broken", "{'id': 'empty'")) or json.loads(r["raw"])["pid"] in \
            r["reason"]
    again, rejects2 = _collection(path, out)  # finished: read back, the same rejected rows
    assert again["rows"] == m["rows"] and rejects2.rows == rejects.rows
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want


def test_jsonl_units_and_a_file_without_rows(tmp_path):
    rows = [{"_id" if i % 3 else "id": f"d{i % 40}", "title": "", "text": f"Text {i} " * (i % 9)}
            for i in range(60)]  # d0..d19 twice; every 9th text empty
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\nnot json\n")
    m, rejects = _collection(str(path), str(tmp_path / "out"), unit_bytes=300)
    want, want_rejects = _one_stream(str(path))
    assert storage.read_parquet(str(tmp_path / "out" / "corpus")).to_pylist() == want
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects
    assert any(f == "_id" and "duplicate" in why for _, f, why in want_rejects)
    for text, detail in (("", "empty file"), ("id\ttext\ttitle\n\n", "only a header")):
        empty = tmp_path / f"e{len(text)}.tsv"
        empty.write_text(text)
        with pytest.raises(DataError, match=rf"e{len(text)}.tsv: no rows \({detail}\)"):
            _collection(str(empty), str(tmp_path / f"out{len(text)}"), unit_bytes=4)


@pytest.mark.parametrize("what", ["row", "duplicate"])
def test_fail_names_the_file_line_of_the_first_defect(tmp_path, what):
    path = _tsv(tmp_path, n=200, bad=(171, 180) if what == "row" else (),
                dups=3 if what == "duplicate" else 0, seed=4)
    with pytest.raises(DataError) as want:
        list(readers.iter_passages(path, "en", readers.Rejects("fail")))
    with pytest.raises(DataError) as got:
        _collection(path, str(tmp_path / "out"), mode="fail")
    assert str(got.value) == str(want.value)
    assert ("tab-separated columns" if what == "row" else "duplicate passage id") in \
        str(got.value)


def test_a_rerun_keeps_the_units_done(tmp_path):
    """A defect in a late unit fails the run; the units before it are recorded and are not
    read again by the next run."""
    path = _tsv(tmp_path, n=200, bad=(191,))
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"psgs.tsv:193: expected 3 tab-separated columns"):
        _collection(path, out, mode="fail")
    records = storage.list_files(f"{out}/_collection/units", ".json")
    n_units = len(plan([path], 1000)[0])
    assert 0 < len(records) < n_units
    before = {u: storage.url_to_fs(u)[0].info(u)["mtime"] for u in records}
    with pytest.raises(DataError, match=r"psgs.tsv:193:"):
        _collection(path, out, mode="fail")
    assert {u: storage.url_to_fs(u)[0].info(u)["mtime"] for u in records} == before


def test_units_on_ray_tasks_over_s3(tmp_path, monkeypatch, ray_local, s3_bucket):
    """On Ray tasks (several units), reading the collection from S3 (seek + readline there)
    and writing the corpus there, and a gzip file as one unit: the rows of one stream."""
    path = _tsv(tmp_path, n=400, bad=(3, 333), dups=10, seed=7)
    uri = f"{s3_bucket}/in/psgs.tsv"
    storage.write_bytes(uri, open(path, "rb").read())
    gz = tmp_path / "psgs.tsv.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    want, want_rejects = _one_stream(path)
    monkeypatch.chdir(tmp_path)  # relative paths: the tasks' working folder is another
    for src, out in ((uri, f"{s3_bucket}/out"), (str(gz), str(tmp_path / "gz")),
                     ("psgs.tsv", "rel")):
        units = plan([src], 2000)[0]
        assert len(units) == (1 if src.endswith(".gz") else len(plan([path], 2000)[0])) >= 1
        m, rejects = _collection(src, out, unit_bytes=2000)
        assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
        assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == [
            (line, fld, why.replace(path, src)) for line, fld, why in want_rejects]
        assert {r["file"] for r in rejects.rows} == {src}  # named as given, relative too
        assert m["rows"] == 400


def test_prepare_of_a_collection_in_units(tmp_path, monkeypatch):
    """``prepare --format passages`` and ``beir`` read the collection in units: the corpus
    and ``_rejected.jsonl`` of one stream."""
    monkeypatch.setattr(collection, "UNIT_BYTES", 1500)
    path = _tsv(tmp_path, n=150, bad=(40,), dups=4, seed=2)
    want, want_rejects = _one_stream(path, "sw")
    out = str(tmp_path / "p")
    summary = prepare("passages", path, out, on_error="skip", shard_rows=9, lang="sw")
    assert len(storage.read_json(f"{out}/_collection/_plan.json")["units"]) > 3
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
    rejected = [json.loads(x) for x in open(f"{out}/_rejected.jsonl", encoding="utf-8")]
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejected) == want_rejects
    assert summary["rejected"] == 5 and summary["rows"]["corpus"] == 150
    first = open(f"{out}/_rejected.jsonl", "rb").read()  # a re-run: the same bytes
    prepare("passages", path, out, on_error="skip", shard_rows=9, lang="sw")
    assert open(f"{out}/_rejected.jsonl", "rb").read() == first
    # a BEIR folder's corpus.jsonl too; its queries and qrels as before
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": r["pid"], "title": r["title"], "text": r["text"]}) + "\n"
        for r in want) + json.dumps({"_id": "p3", "text": "again"}) + "\n")
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "a?"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tp1\t1\n")
    out = str(tmp_path / "b")
    summary = prepare("beir", str(beir), out, on_error="skip", shard_rows=9, lang="sw")
    assert len(storage.read_json(f"{out}/_collection/_plan.json")["units"]) > 3
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
    assert storage.read_parquet(f"{out}/test/qrels").to_pylist() == [
        {"qid": "q1", "pid": "p1", "rel": 1}]
    assert summary["rejected"] == 1 and "duplicate passage id 'p3' (first at line 4)" in \
        open(f"{out}/_rejected.jsonl", encoding="utf-8").read()


@pytest.mark.parametrize("prefix", [b"\xff junk\nid\ttitle\ttext\n",
                                    b"\n\n\xef\xbb\xbfid\ttitle\ttext\n",
                                    b"id\ttitle\ttext\xff\n", b"a\rb\tc\n", b"id\ttitle\ttext\n"])
def test_the_header_is_found_as_one_stream_finds_it(tmp_path, prefix):
    """An undecodable first line, blank lines before a header with a byte-order mark, a bad
    byte in the header, a line csv cannot read (a stray CR): every unit gets the columns
    the stream takes, and the line is rejected with its number."""
    rows = "".join(f"p{i}\tTitle {i}\t{'Text ' * (i % 7 + 1)}{i}\n" for i in range(80))
    path = tmp_path / "c.tsv"
    path.write_bytes(prefix + rows.encode())
    want, want_rejects = _one_stream(str(path))
    m, rejects = _collection(str(path), str(tmp_path / "out"), unit_bytes=200)
    assert len(plan([str(path)], 200)[0]) > 5
    assert storage.read_parquet(str(tmp_path / "out" / "corpus")).to_pylist() == want
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects


def test_a_lost_shard_and_an_older_layout(tmp_path):
    """A shard removed after its unit was read is read again; the shards of an output written
    before units (``part-00000``) are cleared, not read as more rows."""
    path = _tsv(tmp_path, n=120, dups=5)
    out = str(tmp_path / "out")
    storage.write_parquet(f"{out}/corpus/part-00000.parquet", pa.table(
        {"pid": ["old"], "lang": ["en"], "title": [""], "text": ["x"]}))
    want, _ = _one_stream(path)
    _collection(path, out)
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
    shards = storage.list_files(f"{out}/corpus", ".parquet")
    storage.remove(shards[3])
    m, rejects = _collection(path, out)
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want
    assert storage.list_files(f"{out}/corpus", ".parquet") == shards and m["rows"] == 120
    assert sum("duplicate" in r["reason"] for r in rejects.rows) == 5


def test_memory_paths_are_read_here(ray_local):
    """``memory://`` (this process's own store) is never handed to a Ray task."""
    rows = "".join(f"m{i}\tText {i}.\tT\n" for i in range(50))
    storage.write_bytes("memory://coll/c.tsv", rows.encode())
    m, _ = _collection("memory://coll/c.tsv", "memory://coll/out", unit_bytes=100)
    assert len(collection.plan(["memory://coll/c.tsv"], 100)[0]) > 5
    assert storage.read_parquet("memory://coll/out/corpus").column("pid").to_pylist() == [
        f"m{i}" for i in range(50)] and m["rows"] == 50


def test_the_benchmarks_run(tmp_path):
    """benchmarks/prepare_collection.py at a tiny size (units of 20 kB, on a Ray of its own;
    a TSV and canonical JSONL), benchmarks/bucket_check.py (its passes find every duplicate)
    and benchmarks/s3_lines.py: identical runs, the reader faster than s3fs's readline."""
    import subprocess
    import sys

    from tests.conftest import REPO

    for fmt in ("passages", "jsonl"):
        out = tmp_path / f"p-{fmt}.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "prepare_collection.py"),
                        "--passages", "600", "--dups", "9", "--bad", "3", "--unit-bytes",
                        "20000", "--format", fmt, "--out", str(out)], check=True, cwd=REPO,
                       capture_output=True)
        got = json.loads(out.read_text())
        assert got["identical"] and [r["phase"] for r in got["runs"]] == ["units:u20000",
                                                                          "ray:2:u20000"]
        assert all(r["rows"] + r["rejected"] == 600 + 3 for r in got["runs"])
        assert got["runs"][1]["actor_peak_rss_mb"] > 0  # its units ran on Ray workers
        assert got["format"] == fmt and got["runs"][0]["rejected"] >= 3
    out = tmp_path / "b.json"  # the bucket check, in passes of 2,500 ids
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bucket_check.py"), "--ids",
                    "3000,6000", "--bucket-ids", "2500", "--out", str(out)], check=True,
                   cwd=REPO, capture_output=True)
    got = json.loads(out.read_text())
    assert [(r["ids"], r["passes"], r["dups"]) for r in got["runs"]] == [
        (0, 1, 0), (3000, 2, 3), (6000, 3, 6)]
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "s3_lines.py"), "--passages",
                    "2000", "--baseline-lines", "200", "--out", str(out)], check=True,
                   cwd=REPO, capture_output=True)
    got = json.loads(out.read_text())
    assert got["reader_passages"] == 2000 and got["speedup"] > 3


def test_a_full_bucket_is_checked_in_passes(tmp_path, monkeypatch):
    """A bucket holding 30x the ids a pass may hold (its estimate missed): each pass reads
    one share of the hashes, and every duplicate is found with its first row, and every
    named passage (a DPR file's) with its first copy."""
    named = {"k5": passage_digest("", "text 6"), "k6": passage_digest("", "other"),
             "k9": passage_digest("", "text 274"), "k7": 0, "gone": 1}  # k9: its 2nd copy's
    job = collection.Job(["c.tsv"], "en", str(tmp_path / "corpus"), str(tmp_path / "w"), "h",
                         10, False, 1, [None], "p0", True, collection.named_hashes(named))
    ids = collection._Ids(job, collection.Unit(0, 0, 0, None))
    keys = [f"k{i}" for i in range(270)] + [f"k{i}" for i in range(0, 90, 3)]
    for n, k in enumerate(keys, 1):
        ids.add(k, n, "id")
        ids.row({"title": "", "text": f"text {n}"})  # a copy's text: its line
    ids.flush()
    written = storage.read_parquet(collection.bucket_uri(job, 0)).to_pylist()
    assert {r["key"] for r in written if r["digest"]} == {"k5", "k6", "k9"}  # the named with
    n_named = collection.write_named(job, named)[0]  # text: no other row is digested
    sizes = []
    real = collection._check
    monkeypatch.setattr(collection, "_check", lambda tables, named, first, out: sizes.append(
        sum(map(len, tables))) or real(tables, named, first, out))
    monkeypatch.setattr(collection, "BUCKET_IDS", 10)
    got = collection.check_bucket((0, len(keys) + n_named), job)
    assert len(sizes) == 31 and sum(sizes) == 300 and max(sizes) < 30
    found = storage.read_parquet(collection.dups_uri(job)).to_pylist()
    assert got["dups"] == len(found) == 30 and got["first_dup"]["key"] == "k0"
    assert sorted((d["key"], d["line"], d["first_line"], d["fld"]) for d in found) == sorted(
        (f"k{i}", 271 + i // 3, i + 1, "id") for i in range(0, 90, 3))
    assert got["missing"] == ["gone"] and (got["compared"], got["other"]) == (3, 2)
    assert got["first_other"] == [0, 6, "k6"]  # k6 before k9 in file order
    storage.remove(collection.dups_uri(job), recursive=True)
    first = collection.check_bucket((0, len(keys)), dataclasses.replace(job, fail=True))
    assert (first["first_dup"]["key"], first["first_dup"]["line"]) == ("k0", 271)
    assert first["dups"] == 30  # counted in fail mode too
    assert not storage.exists(collection.dups_uri(job))  # fail mode: the first only


def test_a_folder_of_files_in_their_order(tmp_path):
    """A folder collection: its files by name (TSV with and without a header, JSONL, gzip),
    each numbered from its own line 1, an id repeated in a later file named with both files
    and lines, as one stream of each file with one id check over them all."""
    folder = tmp_path / "coll"
    folder.mkdir()
    (folder / "a.tsv").write_text("id\ttext\ttitle\n" + "".join(
        f"a{i}\tText a{i} {'x ' * (i % 9)}\tT\n" for i in range(40)) + "bad\trow\n")
    (folder / "b.jsonl").write_text("".join(json.dumps({"id": f"b{i}", "text": f"B {i}"}) + "\n"
                                            for i in range(30)) + '{"id": "a3", "text": "x"}\n')
    (folder / "c.tsv.gz").write_bytes(gzip.compress("".join(
        f"c{i}\tC {i}\tT\n" for i in range(20)).encode() + b"b7\tagain\tT\n"))
    (folder / "d.tsv").write_text("".join(f"d{i}\tD {i} {'y ' * 30}\tT\n" for i in range(30)))
    files = [str(folder / n) for n in ("a.tsv", "b.jsonl", "c.tsv.gz", "d.tsv")]
    seen, rejects, want = readers.FirstSeen("passage id"), readers.Rejects("skip"), []
    for f in files:  # the reference: each file in one stream, one id check over all
        got = []
        rows = list(readers.iter_passages(f, "en", rejects, unique=False,
                                          ids=lambda k, n, fld, got=got: got.append((k, n, fld))))
        want += [r for r, (k, n, fld) in zip(rows, got, strict=True)
                 if seen.new(k, f, n, fld, rejects, r)]
    m, got_rejects = _collection(str(folder), str(tmp_path / "out"), unit_bytes=300)
    assert len(plan(files, 300)[0]) > 10
    assert storage.read_parquet(str(tmp_path / "out" / "corpus")).to_pylist() == want
    assert sorted((r["file"], r["line"], r["field"], r["reason"]) for r in got_rejects.rows) \
        == sorted((r["file"], r["line"], r["field"], r["reason"]) for r in rejects.rows)
    assert any(f"first at {files[0]}:5" in r["reason"] for r in got_rejects.rows)  # a3
    assert m["rows"] == 40 + 30 + 20 + 30
    (folder / "e.tsv").write_text("id\ttext\ttitle\n")  # a file without rows: its own error
    with pytest.raises(DataError, match=r"e.tsv: no rows \(only a header\)"):
        _collection(str(folder), str(tmp_path / "out2"), unit_bytes=300)
    (folder / "e.tsv").unlink()
    summary = prepare("passages", str(folder), str(tmp_path / "p"), on_error="skip", lang="en")
    assert summary["rows"]["corpus"] == m["rows"] and summary["rejected"] == len(rejects.rows)
    (folder / "notes.md").write_text("about")
    with pytest.raises(DataError, match=r"notes.md is not a passage collection file"):
        _collection(str(folder), str(tmp_path / "out3"))
    (folder / "notes.md").unlink()
    (folder / "sub").mkdir()
    with pytest.raises(DataError, match=r"sub is a folder: a folder collection holds files"):
        _collection(str(folder), str(tmp_path / "out4"))


def test_a_folder_named_as_given_fails_as_one_stream_would(tmp_path, monkeypatch):
    """Relative names in errors; in fail mode a file without rows before a later file's bad
    row is the error, as reading the files in order is; bz2 JSONL is JSONL."""
    import bz2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.tsv").write_text("id\ttext\ttitle\n")
    (tmp_path / "f" / "b.tsv").write_text("b0\tB\tT\nbroken\n")
    with pytest.raises(DataError, match=r"^f/a.tsv: no rows \(only a header\)$"):
        _collection("f", "out", mode="fail")
    (tmp_path / "f" / "a.tsv").write_text("a0\tA\tT\n")
    with pytest.raises(DataError, match=r"^f/b.tsv:2: expected 3 tab-separated columns"):
        _collection("f", "out2", mode="fail")
    (tmp_path / "f" / "b.tsv").unlink()
    (tmp_path / "f" / "c.jsonl.bz2").write_bytes(bz2.compress(b'{"id": "c0", "text": "C"}\n'))
    (tmp_path / "f" / "d.tsv.gz").write_bytes(gzip.compress(b"d0\tD\tT\n" * 50)[:-12])
    with pytest.raises(DataError, match=r"^f/d.tsv.gz: truncated compressed data"):
        _collection("f", "out3")
    (tmp_path / "f" / "d.tsv.gz").unlink()
    m, _ = _collection("f", "out4")
    assert storage.read_parquet("out4/corpus").column("pid").to_pylist() == ["a0", "c0"]


def test_an_s3_folder_with_its_marker_object(s3_server, s3_bucket):
    """An S3 "folder" made in the console has a zero-byte ``name/`` object: not a file."""
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket=bucket, Key="coll/", Body=b"")
    for name in ("b.tsv", "a.jsonl"):
        client.put_object(Bucket=bucket, Key=f"coll/{name}", Body=b'{"id": "x", "text": "y"}\n'
                          if name.endswith("jsonl") else b"z\tZ\tT\n")
    assert collection.collection_files(f"{s3_bucket}/coll") == [
        f"{s3_bucket}/coll/a.jsonl", f"{s3_bucket}/coll/b.tsv"]


def _canonical_rows(n: int, rng: random.Random, tag: str) -> list[str]:
    """Canonical corpus JSONL lines with a defect of each kind and repeated pids."""
    lines = [json.dumps({"pid": f"{tag}{i % (n - 6)}", "lang": "de" if i % 4 else "en",
                         "title": f"T{i}" if i % 5 else None,
                         "text": f"{'Wort ' * rng.randrange(1, 25)}{i}"}) + "\n"
             for i in range(n)]  # the last 6 pids repeat the first 6
    for at, bad in ((3, '{"pid": "x", "lang": "en", "text": "t", "Title": "T"}\n'),
                    (17, '{"lang": "en", "text": "no pid"}\n'),
                    (30, '{"pid": "y", "lang": "en", "text": 7}\n'),
                    (44, '{"pid": "z", "lang": "en", "text": "  "}\n'),
                    (51, "not json\n"), (52, "\n")):
        lines.insert(at, bad)
    return lines


def test_canonical_jsonl_corpus_in_units(tmp_path):
    """``--format jsonl --kind corpus`` is read in byte ranges as the collections are: each
    row's own language, every defect and repeated pid rejected with the file's line, as one
    stream of the file gives them; a folder's files in name order (a TSV there is an
    error); a passage-collection plan of the same output is not reused."""
    rng = random.Random(3)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(_canonical_rows(120, rng, "p")))
    stream = readers.Rejects("skip")  # the reference: one stream, ids in memory
    want = list(readers.iter_canonical_jsonl(str(path), "corpus", stream))
    want_rejects = sorted((r["line"], r["field"], r["reason"].replace("duplicate id",
                                                                      "duplicate passage id"))
                          for r in stream.rows)
    assert len(want_rejects) == 5 + 6 and {r["lang"] for r in want} == {"de", "en"}
    out = str(tmp_path / "out")
    rejects = readers.Rejects("skip")
    m = write_collection(str(path), "und", f"{out}/corpus", f"{out}/_collection", "h", 7,
                         rejects, unit_bytes=400, canonical=True)
    assert len(storage.read_json(f"{out}/_collection/_plan.json")["units"]) > 10
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want and m["rows"] == 120 - 6
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects
    # the same output as a passage collection: planned afresh (pyserini rows need an id)
    again, other = _collection(str(path), out, unit_bytes=400)
    assert again["rows"] == 0 and len(other.rows) == 120 + 5  # every non-blank line, read again
    with pytest.raises(DataError) as one:  # fail mode: the stream's message
        list(readers.iter_canonical_jsonl(str(path), "corpus"))
    with pytest.raises(DataError) as units:
        write_collection(str(path), "und", f"{out}f/corpus", f"{out}f/_collection", "h", 7,
                         readers.Rejects("fail"), unit_bytes=400, canonical=True)
    assert str(units.value) == str(one.value) and "corpus.jsonl:4: field 'Title'" in \
        str(units.value)
    folder = tmp_path / "rows"  # prepare of a folder: a gzip file, pids repeated across files
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress("".join(
        json.dumps({"pid": f"a{i}", "lang": "sw", "text": f"A {i}"}) + "\n"
        for i in range(30)).encode()))
    (folder / "b.jsonl").write_text("".join(json.dumps({"pid": f"b{i}", "lang": "en", "text":
                                                        f"B {'x ' * i}"}) + "\n"
                                            for i in range(60)) +
                                    json.dumps({"pid": "a5", "lang": "en", "text": "t"}) + "\n")
    summary = prepare("jsonl", str(folder), str(tmp_path / "p"), kind="corpus",
                      on_error="skip", shard_rows=8)
    assert summary["rows"]["corpus"] == 90 and summary["rejected"] == 1
    assert storage.read_parquet(str(tmp_path / "p" / "corpus")).column("pid").to_pylist() == [
        *(f"a{i}" for i in range(30)), *(f"b{i}" for i in range(60))]
    rejected = json.loads(open(tmp_path / "p" / "_rejected.jsonl", encoding="utf-8").read())
    assert (rejected["file"], rejected["line"]) == (str(folder / "b.jsonl"), 61)
    assert f"first at {folder / 'a.jsonl.gz'}:6" in rejected["reason"]
    (folder / "c.tsv").write_text("c0\tC\tT\n")
    with pytest.raises(DataError, match=r"c.tsv is not a JSONL file"):
        prepare("jsonl", str(folder), str(tmp_path / "p2"), kind="corpus")


def test_a_unit_writes_up_to_max_shards_named_in_order(tmp_path, monkeypatch):
    """A compressed file is one unit: its shards are numbered with 6 digits (a 1B-row gzip
    file in shards of 2,000), in order; past :data:`MAX_SHARDS` the run stops naming the
    setting to raise."""
    from qgscale.errors import ConfigError

    path = tmp_path / "big.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps({"pid": f"p{i}", "lang": "en", "text":
                                                       f"T {i}"}) + "\n"
                                           for i in range(25)).encode()))
    m = write_collection(str(path), "und", f"{tmp_path}/o/corpus", f"{tmp_path}/o/w", "h", 2,
                         readers.Rejects(), canonical=True)
    names = [s["file"] for s in m["shards"]]
    assert len(names) == 13 and names == sorted(names) and names[-1] == "part-00000-000012.parquet"
    monkeypatch.setattr(collection, "MAX_SHARDS", 12)
    with pytest.raises(ConfigError, match=r"data.shard_rows=2: a byte range of .*big.jsonl.gz "
                                          r"would write over 12 shards; raise shard_rows"):
        write_collection(str(path), "und", f"{tmp_path}/o2/corpus", f"{tmp_path}/o2/w", "h", 2,
                         readers.Rejects(), canonical=True)


def test_rejected_rows_past_the_held_ones_wait_on_disk(tmp_path, monkeypatch):
    """Past ``HELD_REJECTS`` a Rejects keeps its rows in a local file, in order: prepare of a
    collection then holds that many and writes the same ``_rejected.jsonl`` (byte for byte)
    and count as when it held them all."""
    path = _tsv(tmp_path, n=300, bad=tuple(range(10, 290, 9)), dups=25, seed=6)
    out = str(tmp_path / "all")
    whole = prepare("passages", path, out, on_error="skip", shard_rows=9, lang="en")
    want = open(f"{out}/_rejected.jsonl", "rb").read()
    assert whole["rejected"] == 32 + 25 == len(want.splitlines())
    monkeypatch.setattr(readers, "HELD_REJECTS", 4)
    monkeypatch.setattr(collection, "UNIT_BYTES", 2000)
    spill = prepare("passages", path, str(tmp_path / "spill"), on_error="skip", shard_rows=9,
                    lang="en")
    assert (spill["rows"], spill["rejected"]) == (whole["rows"], whole["rejected"])
    assert open(tmp_path / "spill" / "_rejected.jsonl", "rb").read() == want
    rejects = readers.Rejects("skip")
    write_collection(path, "en", f"{tmp_path}/w/corpus", f"{tmp_path}/w/c", "h", 9, rejects,
                     unit_bytes=2000)
    assert len(rejects.rows) == 4 and rejects.count == 57 and rejects.spilled == 53
    assert [json.dumps(r, ensure_ascii=False) for r in rejects] == want.decode().splitlines()


def test_a_plan_is_kept_for_the_same_named_passages_only(tmp_path):
    """A DPR file's units digest its named passages' rows only: a re-run over the same
    collection for another DPR file (other named passages) plans afresh, the same one
    resumes."""
    import numpy as np

    path = _tsv(tmp_path, n=50)
    args = (str(tmp_path / "o" / "corpus"), str(tmp_path / "o" / "w"), "h", 7, False, 1000,
            True, False)

    def plan_id(named: dict[str, int]) -> str:
        return collection._job([path], "en", *args, collection.named_hashes(named))[1].plan_id

    a = plan_id({"p1": 5, "p2": 0})
    assert plan_id({"p1": 5}) == a  # the same passages with text
    assert plan_id({"p1": 5, "p3": 9}) != a
    assert collection.named_hashes({}).dtype == np.uint32


def test_fail_then_skip_on_the_same_output(tmp_path):
    """A fail-mode run stopped by a duplicate, then a skip-mode run into the same output (the
    same key, as a direct caller may give): planned afresh, every duplicate dropped."""
    path = _tsv(tmp_path, n=120, dups=6, seed=8)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="duplicate passage id"):
        _collection(path, out, mode="fail")
    m, rejects = _collection(path, out)
    want, want_rejects = _one_stream(path)
    assert storage.read_parquet(f"{out}/corpus").to_pylist() == want and m["rows"] == 120
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects


@pytest.mark.parametrize("header", ["docid\ttext\ttitle\n", ""])
def test_units_read_quoting_and_headers_as_one_stream(tmp_path, header):
    """Malformed CSV quoting and a header line again (files concatenated) are row defects in
    every unit, as in one stream; psgs_w100's quoting is undone."""
    rows = [f'p{i}\t"Text ""{i}"" {"w " * (i % 7)}"\tTitle {i}\n' for i in range(80)]
    rows[10] = 'p10\t"Hello" world\tTitle\n'
    rows[33] = 'p33\t"open\tTitle\n'
    rows[50] = (header or "id\ttext\ttitle\n")
    path = tmp_path / "c.tsv"
    path.write_text(header + "".join(rows) + ("docid\ttext\ttitle\n" if header else ""))
    want, want_rejects = _one_stream(str(path))
    m, rejects = _collection(str(path), str(tmp_path / "out"), unit_bytes=200)
    assert len(plan([str(path)], 200)[0]) > 5
    assert storage.read_parquet(str(tmp_path / "out" / "corpus")).to_pylist() == want
    assert sorted((r["line"], r["field"], r["reason"]) for r in rejects.rows) == want_rejects
    assert len(want) == 77 and want[0]["text"] == 'Text "0" '
    bad = [(line - bool(header), why.split(":")[0].split(" (")[0]) for line, _, why in
           want_rejects]
    assert bad[:3] == [(11, "malformed TSV line"), (34, "malformed TSV line"),
                       (51, "a header line")]
    assert bad[3:] == ([(81, "a header line")] if header else [])
