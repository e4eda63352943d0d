"""What a user sees while qgscale runs: qgscale's own progress on the console, library noise
(Ray, DeepSpeed, transformers) only from warnings up, and everything in a log file under
the run root (``<run.root>/logs/qgscale.log``; for an ``s3://`` root one file per process,
uploaded after each stage and when the command ends)."""

from __future__ import annotations

import contextlib
import logging
import os

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_FILE_HANDLERS: dict[str, logging.Handler] = {}


class _Console(logging.Filter):
    """qgscale's records from INFO (DEBUG with ``--verbose``), other loggers' from WARNING."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.own = logging.DEBUG if verbose else logging.INFO

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "qgscale" or record.name.startswith("qgscale.")
        return record.levelno >= (self.own if own else logging.WARNING)


#: Per-worker progress bars and weight-loading reports flood the console (workers inherit
#: these variables); the stages' own progress bars remain.
QUIET = (("RAY_DATA_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
         ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"))


def console(verbose: bool = False) -> None:
    """Set up the console: one handler on the root logger with the filter above, and the
    :data:`QUIET` environment (unless already set). Every entry point calls it: the CLI and
    the eval job (``python -m qgscale.eval``)."""
    for key, value in QUIET:
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_qgscale_console", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_Console(verbose))
    handler._qgscale_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    for name in ("ray", "ray.train", "ray.data", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.INFO)  # to the file; the console filters


def to_run_folder(root: str) -> str:
    """Also write every record (all libraries, INFO and up) under the run root: appended to
    ``<root>/logs/qgscale.log`` for a local root; for a remote one (``s3://``), to a local
    temporary file uploaded whole (a log is small) to
    ``<root>/logs/qgscale-<time>-<host>-<pid>.log`` by :func:`sync` (after each pipeline
    stage, and when a command ends, with its error: :func:`failed`), so the log outlives the
    cluster. Returns the log's path or URI."""
    if "://" in root and not root.startswith("file://"):
        return _to_remote(root)
    folder = os.path.join(root.removeprefix("file://"), "logs")
    path = os.path.join(folder, "qgscale.log")
    if path not in _FILE_HANDLERS:
        os.makedirs(folder, exist_ok=True)
        _add_file_handler(path)
    return path


_REMOTE: dict[str, tuple[str, str]] = {}  # remote root -> (local file, its URI)


def _add_file_handler(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    _FILE_HANDLERS[path] = handler


def _to_remote(root: str) -> str:
    import atexit
    import socket
    import tempfile
    import time

    from qgscale import storage

    if root not in _REMOTE:
        fd, path = tempfile.mkstemp(prefix="qgscale-", suffix=".log")
        os.close(fd)
        name = (f"qgscale-{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-"
                f"{os.getpid()}.log")
        _REMOTE[root] = (path, storage.join(root, "logs", name))
        _add_file_handler(path)
        atexit.register(_remove, path)  # uploaded by then (sync)
    return _REMOTE[root][1]


_UPLOADED: set[str] = set()  # local log files whose last sync succeeded


def _remove(path: str) -> None:
    """Remove the local copy of a remote root's log if it is uploaded; else say where it is
    (the only copy)."""
    if path in _UPLOADED:
        with contextlib.suppress(OSError):
            os.remove(path)
    else:
        logging.getLogger("qgscale").warning("the log is not uploaded; it stays in %s", path)


def failed(exc: BaseException) -> None:
    """Record the error a command ends with (and its traceback) in the log files only: the
    console gets it from the command's own report."""
    record = logging.LogRecord("qgscale", logging.ERROR, __file__, 0, "failed: %s", (exc,),
                               (type(exc), exc, exc.__traceback__))
    for handler in _FILE_HANDLERS.values():
        handler.handle(record)


def sync() -> None:
    """Upload the log files of remote run roots (:func:`to_run_folder`); a failed upload is
    a warning (the run goes on)."""
    from qgscale import storage

    for path, uri in _REMOTE.values():
        _FILE_HANDLERS[path].flush()
        try:
            storage.put_file(path, uri)
            _UPLOADED.add(path)
        except Exception as e:  # noqa: BLE001 - a log upload must not stop a run
            _UPLOADED.discard(path)
            logging.getLogger("qgscale").warning("could not upload the log to %s (it stays "
                                                 "in %s): %s", uri, path, e)
