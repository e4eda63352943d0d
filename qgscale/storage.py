"""Storage: fsspec URIs, atomic shard writes, manifests and done markers.

Every path in qgscale is an fsspec URI: a local path, ``file://``, ``s3://`` or ``memory://``.
S3 endpoint and credentials come from the standard AWS variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or from the config's
``storage`` block, which :func:`configure` copies into those variables. Credentials are never
logged and never handed to Ray: workers read them from their own environment (see
:mod:`qgscale.runtime` for the rule, local and on a cluster).

A stage writes its output as shards into one folder::

    out/part-00000.parquet      written atomically (temp name + rename; one PUT on S3)
    out/_done/part-00000.json   done marker: rows and checksum of the shard
    out/_manifest.json          shard list, row counts, checksums, config hash

A re-run skips every shard with a done marker (of the same config hash) and its file; the
manifest is written once all are done. A folder whose manifest lists a shard that is gone has
no :func:`fingerprint`: the pipeline redoes its stage.
Shards are named ``part-%05d`` (:func:`shard_slices`); :meth:`ShardWriter.write_table`,
:meth:`~ShardWriter.write_rows` and :meth:`~ShardWriter.write_shards` name, skip, write and
finalize in one call, and :func:`qgscale.runtime.run_shards` writes shards from Ray actors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from qgscale.errors import DataError, MissingInputError

logger = logging.getLogger("qgscale.storage")

MANIFEST = "_manifest.json"
DONE_DIR = "_done"
# rows per parquet row group of the files qgscale writes: a row-range read (:func:`read_rows`,
# a work unit's slice of a shard) reads its rows' groups only, at most 2 x this many extra rows
ROW_GROUP_ROWS = 1024

_S3_ENV = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region": "AWS_DEFAULT_REGION",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
}


def configure(endpoint_url: str | None = None, region: str | None = None,
              access_key_id: str | None = None, secret_access_key: str | None = None) -> None:
    """Set S3 settings for this process (via the environment). A local Ray started after this
    call (:func:`qgscale.runtime.connect`) passes them on to its workers by inheritance."""
    given = dict(endpoint_url=endpoint_url, region=region, access_key_id=access_key_id,
                 secret_access_key=secret_access_key)
    for key, value in given.items():
        if value:
            os.environ[_S3_ENV[key]] = value
    fsspec.config.conf.pop("s3", None)
    _fs_cache.clear()


def s3_options() -> dict[str, Any]:
    """s3fs keyword arguments from the environment (endpoint passed explicitly, never implied)."""
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        client_kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = os.environ["AWS_DEFAULT_REGION"]
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):  # temporary keys (STS, SSO, assumed roles)
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


_fs_cache: dict[str, fsspec.AbstractFileSystem] = {}


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``uri``."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        key = "s3|" + json.dumps(s3_options(), sort_keys=True)
        if key not in _fs_cache:
            _fs_cache[key] = fsspec.filesystem("s3", **s3_options())
        fs = _fs_cache[key]
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (keeps the scheme)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    """Whether ``uri`` is there now: never from a cached listing (s3fs answers from the
    parent folder's listing when it has one, and other processes write shards and markers)."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def first_existing(*uris: str) -> str:
    """The first of ``uris`` that exists (else the first, for the error message it leads to)."""
    return next((u for u in uris if exists(u)), uris[0])


def makedirs(uri: str) -> None:
    fs, path = url_to_fs(uri)
    if is_local(uri):
        fs.makedirs(path, exist_ok=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly under folder ``uri`` ending in ``suffix``
    (hidden files, such as an unfinished write's temp file, are never listed)."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)  # first: other processes write here (s3fs caches listings)
    if not fs.exists(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False)
                   if p.endswith(suffix) and not posixpath.basename(p).startswith("."))
    return [join(uri, posixpath.basename(p)) for p in names]


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)  # as exists(): a cached listing must not skip the removal
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def read_bytes(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_tail(uri: str, nbytes: int = 1 << 16) -> bytes:
    """The last ``nbytes`` of file ``uri`` (all of it when shorter): its size and one ranged
    read, not the file (a poller of a growing log)."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    size = fs.size(path)
    return fs.cat_file(path, start=max(0, size - nbytes), end=size) if size else b""


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Locally: write a hidden temp file in the same folder, fsync, rename. On object stores a
    single PUT is already atomic (the object appears only when the upload completes).
    """
    if is_local(uri):
        with writing_file(uri) as tmp, open(tmp, "wb") as f:
            f.write(data)
    else:
        fs, path = url_to_fs(uri)
        fs.pipe_file(path, data)


@contextlib.contextmanager
def writing_file(uri: str) -> Iterator[str]:
    """A local path to write the file ``uri`` into (a library that writes files itself, e.g.
    ``faiss.write_index``); on success it appears at ``uri`` whole: locally a temp name in the
    same folder, fsync, rename; remote: streamed from a temp file by ``put_file`` (multipart
    on S3), never held in memory."""
    fs, path = url_to_fs(uri)
    if is_local(uri):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="qgs-put-") as folder:
        tmp = os.path.join(folder, posixpath.basename(path))
        yield tmp
        fs.put_file(tmp, path)


@contextlib.contextmanager
def parquet_sink(uri: str, schema: pa.Schema) -> Iterator[Callable[[pa.Table], None]]:
    """``write(table)``: a parquet file of ``schema`` at ``uri`` written table by table as
    it comes (zstd, :data:`ROW_GROUP_ROWS` row groups), appearing whole on success
    (:func:`writing_file`): one table in memory at a time, not the file."""
    with writing_file(uri) as path, pq.ParquetWriter(path, schema, compression="zstd") as w:
        yield lambda t: w.write_table(t, row_group_size=ROW_GROUP_ROWS)


def put_file(local: str, uri: str) -> None:
    """Copy local file ``local`` to ``uri`` streaming (atomic as :func:`writing_file`)."""
    import shutil

    with writing_file(uri) as tmp:
        shutil.copyfile(local, tmp)


def get_file(uri: str, dest: str) -> None:
    """Download remote file ``uri`` to local ``dest`` (s3fs downloads a file over its block
    size, 50 MiB, in ranges, 10 at once)."""
    fs, path = url_to_fs(uri)
    fs.get_file(path, dest)


@contextlib.contextmanager
def reading_file(uri: str, folder: str | None = None) -> Iterator[str]:
    """A local path holding the file ``uri`` (itself if local, else streamed by
    :func:`get_file` into ``folder`` or a temp folder, removed on exit unless ``folder`` was
    given)."""
    fs, path = url_to_fs(uri)
    if is_local(uri):
        yield path
        return
    if folder is not None:
        dest = os.path.join(folder, posixpath.basename(path))
        get_file(uri, dest)
        yield dest
        return
    with tempfile.TemporaryDirectory(prefix="qgs-get-") as tmp:
        dest = os.path.join(tmp, posixpath.basename(path))
        get_file(uri, dest)
        yield dest


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode())


def table_to_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


def write_parquet(uri: str, table: pa.Table) -> str:
    """Write ``table`` atomically as parquet; returns its sha256."""
    data = table_to_bytes(table)
    write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def parquet_file(uri: str) -> Iterator[Any]:
    """One parquet file, open for reading: a missing file is a MissingInputError, an
    unreadable one an OSError, both naming ``uri``."""
    fs, path = url_to_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            yield f
    except FileNotFoundError:
        raise MissingInputError(f"{uri}: parquet file not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise OSError(f"{uri}: unreadable parquet shard: {e}") from e


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file, or every ``*.parquet`` shard of a folder, as one table."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)  # as exists(): written by another process since a listing?
    if fs.isdir(path):
        files = list_files(uri, ".parquet")
        if not files:
            raise MissingInputError(f"{uri}: no parquet shards in this folder")
        return pa.concat_tables([_read_table(f, columns) for f in files])
    return _read_table(uri, columns)


def _read_table(uri: str, columns: list[str] | None) -> pa.Table:
    with parquet_file(uri) as f:
        return pq.read_table(f, columns=columns)


def read_columns(uri: str, columns: list[str]) -> pa.Table | None:
    """``columns`` of one parquet file, or None when it lacks one of them (one open: the
    footer, then those columns)."""
    with parquet_file(uri) as f:
        pf = pq.ParquetFile(f)
        if not set(columns) <= set(pf.schema_arrow.names):
            return None
        return pf.read(columns=columns)


def read_rows(uri: str, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[start, stop)`` of one parquet file, reading only the row groups that hold them
    (a work unit's slice of a shard costs its own rows, not the shard: :data:`ROW_GROUP_ROWS`).
    A range past the file's end is an error naming the file."""
    with parquet_file(uri) as f:
        pf = pq.ParquetFile(f)
        groups, first, at = [], 0, 0
        for i in range(pf.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if at < stop and at + n > start:
                first = at if not groups else first
                groups.append(i)
            at += n
        if not 0 <= start <= stop <= at:
            raise ValueError(f"{uri}: rows {start}-{stop} asked of a file with {at} rows")
        t = pf.read_row_groups(groups, columns=columns) if groups else \
            pf.schema_arrow.empty_table().select(columns or pf.schema_arrow.names)
    return t.slice(start - first, stop - start)


def read_take(uri: str, rows: Any) -> pa.Table:
    """Rows ``rows`` (sorted row numbers) of one parquet file, in that order, read one row
    group at a time and only those that hold some: memory of one group and the rows kept,
    not the file. A row past the file's end is an error naming the file."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    with parquet_file(uri) as f:
        pf = pq.ParquetFile(f)
        parts, at = [], 0
        for i in range(pf.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            lo, hi = np.searchsorted(rows, [at, at + n])
            if hi > lo:
                parts.append(pf.read_row_group(i).take(pa.array(rows[lo:hi] - at)))
            at += n
        if len(rows) and not 0 <= rows[0] <= rows[-1] < at:
            raise ValueError(f"{uri}: rows {rows[0]}-{rows[-1]} asked of a file with {at} rows")
        return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table()


def footers(files: Iterable[str]) -> list[pq.FileMetaData]:
    """The parquet footers of ``files`` (row counts, schemas), reading no rows."""
    out = []
    for uri in files:
        with parquet_file(uri) as f:
            out.append(pq.ParquetFile(f).metadata)
    return out


def parquet_files(uri: str) -> list[str]:
    """``[uri]`` for a parquet file, its ``*.parquet`` shards for a folder; an empty folder is
    a :class:`MissingInputError`."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)  # as exists(): written by another process since a listing?
    if not fs.isdir(path):
        return [uri]
    files = list_files(uri, ".parquet")
    if not files:
        raise MissingInputError(f"{uri}: no parquet shards in this folder")
    return files


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable config (or pydantic model)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def s3_region(uri: str, endpoint: str | None) -> str:
    """The region pyarrow's S3 filesystem gets for ``uri``: ``AWS_DEFAULT_REGION``, else
    ``AWS_REGION`` (what EKS sets for IRSA), else on AWS itself (no ``endpoint``) the
    bucket's own (pyarrow asks S3), else ``us-east-1``."""
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if not region and not endpoint:
        from pyarrow import fs as pafs

        with contextlib.suppress(OSError):
            region = pafs.resolve_s3_region(uri.split("://", 1)[1].split("/", 1)[0])
    return region or "us-east-1"


def pyarrow_filesystem(uri: str):
    """A pyarrow filesystem for ``uri`` (Ray Train's checkpoint storage), with the S3
    endpoint set explicitly.

    pyarrow's S3 filesystem ignores ``AWS_ENDPOINT_URL``, so we pass ``endpoint_override``;
    it carries no credentials (each process finds its own, see :mod:`qgscale.runtime`).
    """
    if is_local(uri):
        return None
    if uri.startswith(("s3://", "s3a://")):
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            scheme, host = endpoint.split("://", 1) if "://" in endpoint else ("https", endpoint)
            kwargs.update(endpoint_override=host, scheme=scheme)
        # credentials: the AWS default chain (environment, IAM role) wherever the filesystem
        # is used; explicit keys would be pickled into every Ray Data task that gets it
        kwargs["region"] = s3_region(uri, endpoint)
        return pafs.S3FileSystem(**kwargs)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(url_to_fs(uri)[0]))


def ray_path(uri: str) -> str:
    """The path form Ray Data expects together with :func:`pyarrow_filesystem`."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if uri.startswith(("s3://", "s3a://")):
        return uri.split("://", 1)[1]
    return uri


def shard_name(index: int) -> str:
    """The file stem of shard ``index``: ``part-00000``, ``part-00001``, ..."""
    return f"part-{index:05d}"


def shard_slices(n_rows: int, shard_rows: int) -> list[tuple[str, slice]]:
    """Names and row ranges of ``n_rows`` rows cut into shards of ``shard_rows`` (no rows:
    one empty shard, so that the folder still holds a readable table)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows}: expected >= 1")
    return [(shard_name(i // shard_rows), slice(i, min(i + shard_rows, n_rows)))
            for i in range(0, max(n_rows, 1), shard_rows)]


@dataclass
class ShardInfo:
    name: str
    rows: int
    sha256: str


MARKER_ONLY = ("dropped_raw", "dropping")  # what a shard's own rewrite keeps in its marker:
# the rows prepare dropped from it (qgscale.data.unique.drop_rows reads them there)


def _marker(uri: str) -> dict[str, Any]:
    """A done marker, less :data:`MARKER_ONLY` (a shard's dropped rows: not held for every
    shard by :meth:`ShardWriter.markers`)."""
    m = read_json(uri)
    for k in MARKER_ONLY:
        m.pop(k, None)
    return m


class ShardWriter:
    """Writes a stage's shards into ``root`` with done markers and a final manifest.

    ``done(name)`` tells whether a shard is finished; ``write(name, table)`` writes the shard
    atomically and then its marker, so a crash between the two only re-does that shard.
    """

    def __init__(self, root: str, config_hash: str = ""):
        self.root = root
        self.config_hash = config_hash
        makedirs(root)

    def shard_uri(self, name: str) -> str:
        return join(self.root, f"{name}.parquet")

    def marker_uri(self, name: str) -> str:
        return join(self.root, DONE_DIR, f"{name}.json")

    def done(self, name: str) -> bool:
        """Whether shard ``name`` is finished: its marker has this config hash and its file
        is there (a deleted shard is redone)."""
        marker = self.marker_uri(name)
        if not exists(marker) or not exists(self.shard_uri(name)):
            return False
        return read_json(marker).get("config_hash", "") == self.config_hash

    def markers(self) -> dict[str, dict[str, Any]]:
        """``name -> marker`` of every finished shard (as :meth:`done`), from one listing of
        the shards and one of the markers, the markers read by a thread pool: at 10k shards
        a few seconds on S3, not a round trip per shard after another."""
        from concurrent.futures import ThreadPoolExecutor

        files = {posixpath.basename(u) for u in list_files(self.root, ".parquet")}
        uris = [u for u in list_files(join(self.root, DONE_DIR), ".json")
                if posixpath.basename(u)[: -len(".json")] + ".parquet" in files]
        with ThreadPoolExecutor(min(16, len(uris) or 1)) as pool:
            found = list(pool.map(_marker, uris))
        return {m["name"]: m for m in found if m.get("config_hash", "") == self.config_hash}

    def write(self, name: str, table: pa.Table, **extra: Any) -> ShardInfo:
        sha = write_parquet(self.shard_uri(name), table)
        info = ShardInfo(name, table.num_rows, sha)
        write_json(self.marker_uri(name), {"name": name, "rows": table.num_rows, "sha256": sha,
                                        "config_hash": self.config_hash, "time": time.time(),
                                        **extra})
        return info

    def write_shards(self, n_rows: int, shard_rows: int,
                     make: Callable[[str, slice], pa.Table | tuple[pa.Table, dict]], *,
                     desc: str | None = None, done: dict[str, dict] | None = None,
                     **manifest: Any) -> dict:
        """Cut ``n_rows`` rows into shards (:func:`shard_slices`), write every shard not yet
        done (``make(name, rows)`` builds it: its table, or ``(table, marker_extra)``; ``done``:
        the :meth:`markers` when the caller has read them), then the manifest (with
        ``manifest`` fields); returns the manifest. A progress bar named ``desc`` is shown for
        10 shards or more."""
        from tqdm import tqdm

        plan = shard_slices(n_rows, shard_rows)
        done = self.markers() if done is None else done
        for name, rows in tqdm(plan, desc=desc, unit="shard",
                               disable=desc is None or len(plan) < 10):
            if name in done:
                continue
            out = make(name, rows)
            table, extra = out if isinstance(out, tuple) else (out, {})
            self.write(name, table, **extra)
        return self.finalize([name for name, _ in plan], **manifest)

    def write_table(self, table: pa.Table, shard_rows: int, *, desc: str | None = None,
                    **manifest: Any) -> dict:
        """``table`` as shards of ``shard_rows`` rows (see :meth:`write_shards`)."""
        return self.write_shards(table.num_rows, shard_rows,
                                 lambda _, r: table.slice(r.start, r.stop - r.start),
                                 desc=desc, **manifest)

    def write_rows(self, rows: Iterable[Mapping[str, Any]], shard_rows: int,
                   schema: pa.Schema, *, desc: str | None = None, **manifest: Any) -> dict:
        """Row dicts (a list or a stream: only one shard is held at a time) as shards of
        ``shard_rows`` rows of ``schema``, done shards skipped; returns the manifest."""
        from tqdm import tqdm

        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows}: expected >= 1")
        names: list[str] = []
        chunk: list[Mapping[str, Any]] = []
        bar = tqdm(desc=desc, unit="shard", disable=desc is None, delay=2.0)  # long ones only
        done = self.markers()

        def flush() -> None:
            name = shard_name(len(names))
            names.append(name)
            if name not in done:
                self.write(name, pa.Table.from_pylist(chunk, schema=schema))
            bar.update(1)

        for row in rows:
            chunk.append(row)
            if len(chunk) == shard_rows:
                flush()
                chunk = []
        if chunk or not names:  # no rows at all: one empty shard, a readable table
            flush()
        bar.close()
        return self.finalize(names, **manifest)

    def finished(self, markers: dict[str, dict[str, Any]] | None = None) -> list[ShardInfo]:
        """The finished shards, by name (``markers``: those :meth:`markers` just read)."""
        found = self.markers() if markers is None else markers
        return sorted((ShardInfo(m["name"], m["rows"], m["sha256"]) for m in found.values()),
                      key=lambda s: s.name)

    def finalize(self, expected: Iterable[str] | None = None,
                 markers: dict[str, dict[str, Any]] | None = None, **extra: Any) -> dict:
        """Write ``_manifest.json`` once every expected shard is done; returns the manifest
        (listing the ``expected`` shards when given, else every finished one). ``markers``:
        those the caller read after the last write (:meth:`markers`), not read again."""
        shards = self.finished(markers)
        if expected is not None:
            want = set(expected)
            missing = sorted(want - {s.name for s in shards})
            if missing:
                raise RuntimeError(f"{self.root}: shards not finished: {missing[:10]}")
            shards = [s for s in shards if s.name in want]
        manifest = {
            "shards": [s.__dict__ | {"file": f"{s.name}.parquet"} for s in shards],
            "rows": sum(s.rows for s in shards),
            "config_hash": self.config_hash,
            "time": time.time(),
            **extra,
        }
        write_json(join(self.root, MANIFEST), manifest)
        return manifest


def read_manifest(root: str) -> dict | None:
    uri = join(root, MANIFEST)
    return read_json(uri) if exists(uri) else None


def fingerprint(uri: str) -> str | None:
    """Identity of what is at ``uri`` now (a file or a folder tree): a hash of every file's
    relative path, size and modification time / ETag, from one listing (only manifests are
    read). ``None`` when nothing is there, or when a shard that a folder's manifest lists is
    gone (a lost object: the output is incomplete). A rewritten file changes it even at the
    same path."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return None
    if fs.isdir(path):
        found = fs.find(path, detail=True)
    else:
        found = {path: fs.info(path)}
    for name in [n for n in found if posixpath.basename(n) == MANIFEST]:
        folder = posixpath.dirname(name)
        shards = json.loads(fs.cat_file(name)).get("shards", [])
        if any(isinstance(sh, dict) and "file" in sh
               and posixpath.join(folder, sh["file"]) not in found for sh in shards):
            return None
    entries = []
    for name, info in sorted(found.items()):
        rel = posixpath.relpath(name, path) if name != path else posixpath.basename(path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # unfinished writes' temp files
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        entries.append([rel, info.get("size"), str(stamp)])
    return config_hash(entries)


def stage_done(root: str, config_hash: str) -> bool:
    """True when ``root`` holds a manifest written with ``config_hash``."""
    m = read_manifest(root)
    return m is not None and m.get("config_hash") == config_hash


def write_manifest(root: str, config_hash: str, **extra: Any) -> dict:
    """Manifest for a stage whose output is not parquet shards (a model, an index)."""
    manifest = {"config_hash": config_hash, "time": time.time(), **extra}
    write_json(join(root, MANIFEST), manifest)
    return manifest


FETCH_TRIES = 3  # downloads of a folder that changes while it is fetched


def local_dir(uri: str, cache: str | None = None, names: list[str] | None = None) -> str:
    """A local folder holding the contents of folder ``uri`` (downloaded once if remote), or
    only its files ``names`` (an on-disk index shard and its ``.ivfdata``, not every shard's).

    The cache is keyed by the URI *and* its :func:`fingerprint` (of ``names`` when given), so
    a model retrained at the same URI is downloaded again rather than served stale. The
    fingerprint is taken again after the download: a file rewritten meanwhile (s3fs fetches
    a large object in ranges, which could then come from two versions) means the copy is
    thrown away and fetched again, at most :data:`FETCH_TRIES` times."""
    if is_local(uri):
        return url_to_fs(uri)[1]
    import shutil

    cache = cache or os.environ.get("QGSCALE_CACHE", os.path.expanduser("~/.cache/qgscale"))

    def key() -> str:
        return (f"{uri}\n{fingerprint(uri)}" if names is None else
                f"{uri}\n{[[n, fingerprint(join(uri, n))] for n in names]}")

    for _ in range(FETCH_TRIES):
        before = key()
        dest = os.path.join(cache, hashlib.sha256(before.encode()).hexdigest()[:16])
        if os.path.exists(os.path.join(dest, ".complete")):
            return dest
        tmp = _fetch(uri, names, dest)
        if key() == before:
            return _settle(tmp, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("%s changed while it was downloaded: fetching it again", uri)
    raise DataError(f"{uri} changed during each of {FETCH_TRIES} downloads: is another "
                    "job rewriting it? Re-run once it is written")


def _fetch(uri: str, names: list[str] | None, dest: str) -> str:
    """Download folder ``uri`` (or its files ``names``) into a new temporary folder beside
    ``dest``, marked complete; returns it. A failed fetch leaves no partial copy."""
    import shutil

    fs, path = url_to_fs(uri)
    tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
    root = path.rstrip("/")
    try:
        if names is None:
            fs.get(root + "/", tmp, recursive=True)
        else:  # these files only, fetched together
            os.makedirs(tmp)
            fs.get([posixpath.join(root, n) for n in names],
                   [os.path.join(tmp, *n.split("/")) for n in names])
        open(os.path.join(tmp, ".complete"), "w").close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial copy left in the cache
        raise
    return tmp


def _settle(tmp: str, dest: str) -> str:
    """Move the complete download ``tmp`` to ``dest`` (the cache entry); returns ``dest``."""
    import shutil

    done = os.path.join(dest, ".complete")
    if os.path.isdir(dest) and not os.path.exists(done):  # an unfinished copy: set it aside
        trash = f"{dest}.old-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
    try:  # several processes on a node may download at once: the first rename wins
        os.rename(tmp, dest)
    except OSError:
        if not os.path.exists(done):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process's complete copy is in place
    return dest


def upload_dir(local: str, uri: str) -> None:
    """Copy local folder ``local`` to folder ``uri`` (file by file, each write atomic)."""
    for dirpath, _, files in os.walk(local):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, local)
            put_file(full, join(uri, *rel.split(os.sep)))
