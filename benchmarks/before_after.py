"""Before/after benchmarks in child processes, measured from outside.

A benchmark script runs each phase as ``script --child PHASE DATA OUT`` in a child process
with a source tree first on ``PYTHONPATH``: this checkout, and with ``--baseline-src DIR``
an older one before it, so both are measured in the same run. A sampler thread reads every
0.1 s the resident memory (RSS, psutil) of the child and of its largest ``ray::`` worker.
Used by ``bm25_memory.py`` and ``corpus_join.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """An argument parser with ``--child``, ``--baseline-src`` and ``--out`` (default
    ``benchmarks/results/<out>``)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--baseline-src", type=Path, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / out))
    return ap


def parse(ap: argparse.ArgumentParser, child: Callable[..., None]) -> argparse.Namespace:
    """The arguments; with ``--child``, runs ``child(phase, data, out)`` and exits."""
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        sys.exit(0)
    return args


def trees(baseline_src: Path | None) -> list[tuple[str, Path]]:
    """``("baseline", DIR)`` when given, then ``("this", REPO)``."""
    return ([("baseline", baseline_src.resolve())] if baseline_src else []) + [("this", REPO)]


def measure(src: Path, phase: str, data: Path, out: Path, script: str
            ) -> dict[str, Any]:
    """Run ``script --child phase data out`` with ``src`` first on PYTHONPATH, sampling its
    RSS and its largest Ray worker's every 0.1 s, and their USS (memory no other process
    shares: not the object store pages a worker reads) every 0.5 s, and the child's CPU
    seconds (user + system, as last sampled)."""
    import psutil

    env = dict(os.environ, PYTHONPATH=f"{src}:{REPO}", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, script, "--child", phase, str(data), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=src)
    peak = {"driver": 0, "actor": 0, "driver_uss": 0, "actor_uss": 0, "driver_cpu": 0.0}
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        tick = 0
        while not done.is_set():
            uss = tick % 5 == 0  # reading smaps costs more than RSS
            tick += 1
            try:
                peak["driver"] = max(peak["driver"], p.memory_info().rss)
                peak["driver_cpu"] = sum(p.cpu_times()[:2])  # user + system, last seen
                if uss:
                    peak["driver_uss"] = max(peak["driver_uss"], p.memory_full_info().uss)
                for c in p.children(recursive=True):
                    try:
                        if c.cmdline()[:1] and c.cmdline()[0].startswith("ray::"):
                            peak["actor"] = max(peak["actor"], c.memory_info().rss)
                            if uss:
                                peak["actor_uss"] = max(peak["actor_uss"],
                                                        c.memory_full_info().uss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{phase} with {src} failed (exit {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {**res, "driver_peak_rss_mb": round(peak["driver"] / MB, 1),
            "actor_peak_rss_mb": round(peak["actor"] / MB, 1),
            "driver_peak_uss_mb": round(peak["driver_uss"] / MB, 1),
            "actor_peak_uss_mb": round(peak["actor_uss"] / MB, 1),
            "driver_cpu_s": round(peak["driver_cpu"], 1)}


def commit(src: Path) -> str:
    return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"


def save(out: str, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``out``."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
