"""What a user sees while qgscale runs: qgscale's own progress on the console, library noise
(Ray, DeepSpeed, transformers) only from warnings up, and everything in a log file under
the run root (``<run.root>/logs/qgscale.log``, local roots)."""

from __future__ import annotations

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


def to_run_folder(root: str) -> str | None:
    """Also write every record (all libraries, INFO and up) to ``<root>/logs/qgscale.log``
    when the run root is local; returns the file's path (None for remote roots)."""
    if "://" in root and not root.startswith("file://"):
        return None
    folder = os.path.join(root.removeprefix("file://"), "logs")
    path = os.path.join(folder, "qgscale.log")
    if path in _FILE_HANDLERS:
        return path
    os.makedirs(folder, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    _FILE_HANDLERS[path] = handler
    return path
