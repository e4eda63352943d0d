"""Storage layer: round trips on local disk and a real S3 endpoint, atomic writes, resume."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qgscale import storage
from qgscale.errors import DataError


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"qid": [f"q{i}" for i in range(start, start + n)],
                     "x": list(range(start, start + n))})


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def test_roundtrip(root):
    sha = storage.write_parquet(storage.join(root, "a.parquet"), _table(5))
    assert len(sha) == 64
    storage.write_parquet(storage.join(root, "b.parquet"), _table(3, 5))
    storage.write_json(storage.join(root, "meta.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(root, "meta.json")) == {"k": [1, 2]}
    assert [os.path.basename(u) for u in storage.list_files(root, ".parquet")] == \
        ["a.parquet", "b.parquet"]
    both = storage.read_parquet(root)  # a folder reads as all its shards, in order
    assert both.column("x").to_pylist() == list(range(8))
    assert storage.read_parquet(storage.join(root, "b.parquet"), ["qid"]).column_names == ["qid"]


def test_unreadable_shard_names_the_file(root):
    bad = storage.join(root, "bad.parquet")
    storage.write_bytes(bad, b"this is not parquet")
    with pytest.raises(OSError, match="bad.parquet: unreadable parquet shard"):
        storage.read_parquet(bad)


def test_read_rows_reads_only_the_row_groups_of_its_range(root):
    """A work unit's slice of a shard: the same rows as slicing the whole file, and only its
    row groups are read (a group outside the range is corrupted and the read still works)."""
    n, g = 3000, storage.ROW_GROUP_ROWS
    uri = storage.join(root, "a.parquet")
    storage.write_parquet(uri, _table(n))
    whole = storage.read_parquet(uri)
    for start, stop in [(0, 10), (g - 5, g + 5), (g, 2 * g), (2 * g + 1, n), (0, n), (7, 7)]:
        assert storage.read_rows(uri, start, stop).equals(whole.slice(start, stop - start))
    assert storage.read_rows(uri, 5, 9, ["x"]).to_pydict() == {"x": [5, 6, 7, 8]}
    with pytest.raises(ValueError, match=r"a.parquet: rows 2990-3010 asked of a file with 3000"):
        storage.read_rows(uri, 2990, 3010)
    data = bytearray(storage.read_bytes(uri))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    assert meta.num_row_groups == 3
    for c in range(meta.num_columns):  # garble the pages of row group 0
        col = meta.row_group(0).column(c)
        at = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        size = col.total_compressed_size
        data[at:at + size] = b"\xff" * size
    storage.write_bytes(uri, bytes(data))
    assert storage.read_rows(uri, g + 3, n).column("x").to_pylist() == list(range(g + 3, n))
    with pytest.raises(OSError, match="a.parquet: unreadable parquet shard"):
        storage.read_rows(uri, 0, 10)


def test_shard_writer_resume(root):
    w = storage.ShardWriter(root, config_hash="h1")
    names = [f"part-{i:05d}" for i in range(4)]
    for n in names[:2]:
        w.write(n, _table(10))
    with pytest.raises(RuntimeError, match="not finished"):
        w.finalize(names)
    # A re-run (new writer, same root and config) sees the finished shards and skips them.
    again = storage.ShardWriter(root, config_hash="h1")
    todo = [n for n in names if not again.done(n)]
    assert todo == names[2:]
    for n in todo:
        again.write(n, _table(10))
    manifest = again.finalize(names)
    assert manifest["rows"] == 40 and len(manifest["shards"]) == 4
    assert storage.stage_done(root, "h1") and not storage.stage_done(root, "h2")
    # A changed config invalidates the done markers.
    assert not storage.ShardWriter(root, config_hash="h2").done(names[0])
    # A shard file deleted after its marker (a lost object) is not done: it is redone.
    storage.remove(again.shard_uri(names[1]))
    assert not again.done(names[1]) and again.done(names[0])
    assert sorted(again.markers()) == [names[0], *names[2:]]
    assert again.markers()[names[0]]["rows"] == 10
    with pytest.raises(RuntimeError, match=r"not finished: \['part-00001'\]"):
        again.finalize(names)


def test_shard_writer_writes_names_skips_and_finalizes(root):
    """write_table / write_rows / write_shards: ``part-%05d`` shards of ``shard_rows``, done
    shards kept on a re-run, the manifest listing exactly this run's shards."""
    assert storage.shard_slices(5, 2) == [("part-00000", slice(0, 2)),
                                          ("part-00001", slice(2, 4)),
                                          ("part-00002", slice(4, 5))]
    assert storage.shard_slices(0, 2) == [("part-00000", slice(0, 0))]
    table = _table(5)
    m = storage.ShardWriter(root, "h1").write_table(table, 2, source="t")
    assert [s["name"] for s in m["shards"]] == ["part-00000", "part-00001", "part-00002"]
    assert m["rows"] == 5 and m["source"] == "t"
    assert storage.read_parquet(root).to_pylist() == table.to_pylist()
    times = {s["name"]: storage.read_json(storage.join(root, storage.DONE_DIR,
                                                       f"{s['name']}.json"))["time"]
             for s in m["shards"]}
    storage.remove(storage.join(root, storage.DONE_DIR, "part-00001.json"))
    made = []

    def make(name: str, rows: slice):
        made.append(name)
        return table.slice(rows.start, rows.stop - rows.start), {"note": name}

    again = storage.ShardWriter(root, "h1").write_shards(5, 2, make)
    assert made == ["part-00001"] and again["rows"] == 5
    redone = storage.read_json(storage.join(root, storage.DONE_DIR, "part-00001.json"))
    assert redone["note"] == "part-00001" and redone["time"] > times["part-00001"]
    # rows of dicts; no rows still gives one (empty) shard
    empty = storage.join(root, "empty")
    m = storage.ShardWriter(empty, "h1").write_rows([], 2, table.schema)
    assert [s["name"] for s in m["shards"]] == ["part-00000"] and m["rows"] == 0
    assert storage.read_parquet(empty).schema == table.schema
    rows = storage.join(root, "rows")
    m = storage.ShardWriter(rows, "h1").write_rows(table.to_pylist(), 4, table.schema)
    assert len(m["shards"]) == 2 and storage.read_parquet(rows).equals(table)


WRITER = textwrap.dedent("""
    import os, sys, time
    from qgscale import storage
    real_fsync = os.fsync
    def slow_fsync(fd):  # hold the process inside the write so the test can kill it there
        open(sys.argv[2], "w").close()
        time.sleep(60)
    os.fsync = slow_fsync
    storage.write_bytes(sys.argv[1], b"x" * 1_000_000)
""")


def test_killed_local_writer_leaves_no_visible_shard(tmp_path):
    target = tmp_path / "shards" / "part-00000.parquet"
    flag = tmp_path / "in-write"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(flag)])
    deadline = time.time() + 30
    while not flag.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    assert storage.list_files(str(tmp_path / "shards"), ".parquet") == []
    leftovers = os.listdir(tmp_path / "shards")
    assert leftovers and all(n.startswith(".") for n in leftovers)  # only a hidden temp file


S3_WRITER = textwrap.dedent("""
    import sys
    from qgscale import storage
    print("start", flush=True)
    storage.write_bytes(sys.argv[1], b"y" * 200_000_000)
""")


def test_killed_s3_writer_leaves_nothing_or_everything(s3_bucket):
    uri = storage.join(s3_bucket, "big", "part-00000.parquet")
    proc = subprocess.Popen([sys.executable, "-c", S3_WRITER, uri], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"start"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs, path = storage.url_to_fs(uri)
    fs.invalidate_cache()
    if fs.exists(path):  # a single PUT is all or nothing
        assert fs.size(path) == 200_000_000
    else:
        assert storage.list_files(storage.join(s3_bucket, "big"), ".parquet") == []


def test_fingerprint_of_a_folder_missing_a_manifest_shard_is_none(root):
    """A stage's output with a shard gone (a lost object, a deleted file) is not there: the
    pipeline sees the stage as missing and redoes it, instead of its descendants rerunning
    on the incomplete output."""
    m = storage.ShardWriter(storage.join(root, "a"), "h").write_table(_table(5), 2)
    storage.write_json(storage.join(root, "b", "meta.json"), {"k": 1})
    before = storage.fingerprint(root)
    assert before is not None and storage.fingerprint(root) == before
    storage.remove(storage.join(root, "a", m["shards"][1]["file"]))
    assert storage.fingerprint(root) is None
    assert storage.fingerprint(storage.join(root, "b")) is not None


def test_config_hash_is_stable():
    assert storage.config_hash({"a": 1, "b": [2]}) == storage.config_hash({"b": [2], "a": 1})
    assert storage.config_hash({"a": 1}) != storage.config_hash({"a": 2})


def test_local_dir_downloads_a_remote_folder(s3_bucket, tmp_path):
    storage.write_bytes(storage.join(s3_bucket, "model", "config.json"), b"{}")
    storage.write_bytes(storage.join(s3_bucket, "model", "sub", "w.bin"), b"123")
    local = storage.local_dir(storage.join(s3_bucket, "model"), cache=str(tmp_path))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"123"
    storage.upload_dir(local, storage.join(s3_bucket, "copy"))
    assert storage.read_bytes(storage.join(s3_bucket, "copy", "sub", "w.bin")) == b"123"


def test_local_dir_of_some_files_and_no_partial_copy(s3_bucket, tmp_path):
    """``local_dir(names=)`` fetches only those files of the folder (an on-disk index shard
    and its .ivfdata), byte for byte; a failed fetch leaves nothing in the cache."""
    big, other = os.urandom(3_000_000), os.urandom(1_000)
    storage.write_bytes(f"{s3_bucket}/m/shard-0.faiss", other)
    storage.write_bytes(f"{s3_bucket}/m/shard-0.faiss.ivfdata", big)
    storage.write_bytes(f"{s3_bucket}/m/shard-1.faiss.ivfdata", big)
    local = storage.local_dir(f"{s3_bucket}/m", cache=str(tmp_path / "c"),
                              names=["shard-0.faiss", "shard-0.faiss.ivfdata"])
    assert sorted(os.listdir(local)) == [".complete", "shard-0.faiss", "shard-0.faiss.ivfdata"]
    assert open(os.path.join(local, "shard-0.faiss.ivfdata"), "rb").read() == big
    with pytest.raises(FileNotFoundError):
        storage.local_dir(f"{s3_bucket}/m", cache=str(tmp_path / "c"), names=["none.faiss"])
    assert os.listdir(tmp_path / "c") == [os.path.basename(local)]  # no temp copy left


@pytest.mark.parametrize("names", [None, ["shard-0.faiss"]])
def test_local_dir_fetches_again_a_file_rewritten_while_it_downloads(s3_bucket, tmp_path,
                                                                     monkeypatch, names):
    """A file rewritten on S3 during the download (its ranges could come from two versions)
    is fetched again: the copy holds the new bytes; a file rewritten during every try is an
    error naming it, and nothing is left in the cache. The rewrite is real; only its timing
    (right after the fetch) is arranged."""
    uri = f"{s3_bucket}/m-{uuid.uuid4().hex}"
    storage.write_bytes(f"{uri}/shard-0.faiss", b"v0")
    fetch, rewrites = storage._fetch, []

    def fetch_then_rewrite(*a):
        out = fetch(*a)
        if len(rewrites) < limit:
            rewrites.append(1)
            storage.write_bytes(f"{uri}/shard-0.faiss", b"v%d" % len(rewrites))
        return out

    monkeypatch.setattr(storage, "_fetch", fetch_then_rewrite)
    limit = 1
    local = storage.local_dir(uri, cache=str(tmp_path / "c"), names=names)
    assert open(os.path.join(local, "shard-0.faiss"), "rb").read() == b"v1"
    assert len(rewrites) == 1 and os.listdir(tmp_path / "c") == [os.path.basename(local)]
    limit = 1 + storage.FETCH_TRIES
    with pytest.raises(DataError, match=f"{uri} changed during each of 3 downloads"):
        storage.local_dir(uri, cache=str(tmp_path / "d"), names=names)
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_tail_reads_the_end_of_a_file(where, tmp_path, s3_bucket):
    """The training progress poller's read: the last bytes of a growing log, whole when
    short, nothing for an empty file; a rewritten file's new end."""
    uri = (str(tmp_path / "m.jsonl") if where == "local" else f"{s3_bucket}/m.jsonl")
    storage.write_bytes(uri, b"".join(b'{"step": %d}\n' % i for i in range(5000)))
    assert storage.read_tail(uri, 100).splitlines()[-1] == b'{"step": 4999}'
    assert len(storage.read_tail(uri, 100)) == 100
    storage.write_bytes(uri, b'{"step": 1}\n')
    assert storage.read_tail(uri) == b'{"step": 1}\n'
    storage.write_bytes(uri, b"")
    assert storage.read_tail(uri) == b""


LOAD_MODEL = """
import os, sys, time, uuid
from qgscale import storage
model, cache, flags, n, procs = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
local = storage.local_dir(model, cache=cache)
open(os.path.join(flags, uuid.uuid4().hex), "w").close()
deadline = time.time() + 60
while len(os.listdir(flags)) < procs and time.time() < deadline:  # read while others fetch
    for i in range(n):
        with open(os.path.join(local, f"f{i}.bin"), "rb") as f:
            assert f.read() == str(i).encode(), i
"""


def test_local_dir_downloaded_by_several_processes_at_once(s3_bucket, tmp_path):
    """Actors on one node may fetch the same model together: every one gets the whole
    folder, and none deletes files another is reading (each once ran rmtree on the folder).
    Each process reads its copy until every process has one."""
    model, n, procs = storage.join(s3_bucket, f"model-{uuid.uuid4().hex}"), 40, 4
    for i in range(n):
        storage.write_bytes(storage.join(model, f"f{i}.bin"), str(i).encode())
    cache, flags = tmp_path / "cache", tmp_path / "flags"
    flags.mkdir()
    running = [subprocess.Popen([sys.executable, "-c", LOAD_MODEL, model, str(cache),
                                 str(flags), str(n), str(procs)], stderr=subprocess.PIPE,
                                text=True) for _ in range(procs)]
    failed = [err for p in running for err in [p.communicate()[1]] if p.returncode]
    assert failed == []
    local = storage.local_dir(model, cache=str(cache))
    assert [p.name for p in cache.iterdir()] == [os.path.basename(local)]  # no temp copy


@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_writes_and_reads_stream_through_local_files(where, tmp_path, s3_bucket):
    """``writing_file``: a library writes a local file that appears at the URI whole
    (``put_file`` from the local file on S3); nothing appears when the writer fails;
    ``reading_file`` gives a local copy."""
    root = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    uri = storage.join(root, "big.bin")
    data = os.urandom(12 << 20)
    with storage.writing_file(uri) as local:
        assert not storage.exists(uri)
        with open(local, "wb") as f:
            f.write(data)
    with storage.reading_file(uri) as local, open(local, "rb") as f:
        assert f.read() == data
    with pytest.raises(RuntimeError), storage.writing_file(storage.join(root, "no.bin")) as local:
        with open(local, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("writer failed")
    assert not storage.exists(storage.join(root, "no.bin"))
    assert [os.path.basename(u) for u in storage.list_files(root)] == ["big.bin"]


def test_s3_session_token_is_passed(s3_bucket, monkeypatch):
    """Temporary credentials (STS, SSO, an assumed role) are key + secret + session token:
    the token reaches the filesystem with the keys, which pass them to every request."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-123")
    storage._fs_cache.clear()
    try:
        fs, _ = storage.url_to_fs(f"{s3_bucket}/t.json")
        assert fs.key and fs.token == "session-token-123"
        storage.write_json(f"{s3_bucket}/t.json", {"a": 1})  # moto takes any token
        assert storage.read_json(f"{s3_bucket}/t.json") == {"a": 1}
    finally:
        storage._fs_cache.clear()


def test_unit_reads_benchmark_reads_less_by_row_group(tmp_path):
    """benchmarks/unit_reads.py on a small shard: both ways read every row; by row group a
    unit reads about its own rows' share of the file."""
    from tests.conftest import load_benchmark

    bench = load_benchmark("unit_reads")
    path = str(tmp_path / "part-00000.parquet")
    bench.pair_shard(path, 12_000)
    res = bench.measure(path, 12_000, 1000)
    whole, groups = res["whole shard, sliced"], res["its row groups (read_rows)"]
    assert whole["units"] == groups["units"] == 12
    assert groups["mb_read"] * 4 < whole["mb_read"]  # 1-2 groups of ~12 per unit


LOG_TO_S3 = """
import logging, sys
from qgscale import logs
logs.console()
uri = logs.to_run_folder(sys.argv[1])
assert logs.to_run_folder(sys.argv[1]) == uri  # one log file per root and process
logging.getLogger("qgscale").info("first line")
logs.sync()
print(uri, logs._REMOTE[sys.argv[1]][0], flush=True)
sys.stdin.readline()  # the test reads the upload so far, then lets the process go on
logging.getLogger("qgscale").info("last line")
logs.sync()
"""


def test_a_remote_run_roots_log_is_uploaded_at_each_sync(s3_bucket):
    """With an ``s3://`` run root the log outlives the cluster: each sync (after each
    pipeline stage, at the end of a command) uploads it whole under ``<root>/logs/``."""
    root = f"{s3_bucket}/run"
    p = subprocess.Popen([sys.executable, "-c", LOG_TO_S3, root], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri, local = p.stdout.readline().split()
    assert uri.startswith(f"{root}/logs/qgscale-") and uri.endswith(f"-{p.pid}.log")
    first = storage.read_bytes(uri).decode()
    assert "qgscale INFO first line" in first and "last line" not in first
    err = p.communicate("\n", timeout=60)[1]
    assert p.returncode == 0 and "could not upload" not in err, err
    storage.url_to_fs(uri)[0].invalidate_cache()  # this process read the first upload
    assert "qgscale INFO last line" in storage.read_bytes(uri).decode()
    assert not os.path.exists(local)  # uploaded: its local copy is gone
    # a bucket that does not exist: the upload fails, the local copy stays and is named
    p = subprocess.Popen([sys.executable, "-c", LOG_TO_S3, f"{s3_bucket}-missing/run"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    uri, local = p.stdout.readline().split()
    err = p.communicate("\n", timeout=60)[1]
    assert f"the log is not uploaded; it stays in {local}" in err, err
    assert "qgscale INFO last line" in open(local).read()
    os.remove(local)


def test_a_folder_written_elsewhere_after_its_parent_was_listed(s3_server, s3_bucket):
    """s3fs answers isdir/exists/isfile from a cached listing of the parent folder: a folder
    another process wrote after this one listed the parent read as not found."""
    import boto3

    from qgscale.data.joins import shard_files

    base = storage.join(s3_bucket, "run")
    storage.write_parquet(storage.join(base, "a", "part-00000.parquet"), _table(2))
    fs, path = storage.url_to_fs(base)
    client = boto3.client("s3", endpoint_url=s3_server)  # another writer
    readers = {"read_parquet": lambda u: storage.read_parquet(u).to_pylist(),
               "parquet_files": storage.parquet_files,
               "shard_files": lambda u: shard_files(u, "queries"),
               "shard_files of a file": lambda u: shard_files(f"{u}/part-00000.parquet", "x")}
    for name, read in readers.items():
        child = storage.join(base, name.replace(" ", "-"))
        assert storage.join(base, "a") in [f"s3://{p}" for p in fs.ls(path)]  # cached
        client.put_object(Bucket=s3_bucket.removeprefix("s3://"),
                          Key=f"run/{name.replace(' ', '-')}/part-00000.parquet",
                          Body=storage.table_to_bytes(_table(3)))
        want = _table(3).to_pylist() if name == "read_parquet" else [
            storage.join(child, "part-00000.parquet")]
        assert read(child) == want, name


def test_pyarrow_filesystem_region(s3_bucket, monkeypatch):
    """Ray Train's S3 filesystem takes AWS_DEFAULT_REGION, else AWS_REGION (EKS sets only it
    for IRSA; us-east-1 was forced then), else us-east-1 with a custom endpoint; it reads
    the bucket either way."""
    storage.write_bytes(f"{s3_bucket}/r.txt", b"x")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs = storage.pyarrow_filesystem(f"{s3_bucket}/r.txt")
    assert fs.region == "eu-west-1"
    with fs.open_input_stream(storage.ray_path(f"{s3_bucket}/r.txt")) as f:
        assert f.read() == b"x"
    monkeypatch.delenv("AWS_REGION")
    assert storage.pyarrow_filesystem(f"{s3_bucket}/r.txt").region == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage.pyarrow_filesystem(f"{s3_bucket}/r.txt").region == "ap-south-1"
