"""The Bloom filter of passage ids that the Ray Data row joins push down to the corpus read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa

from qgscale.data.pidfilter import BITS_PER_PID, PidFilter, key_hashes


def _filter(pids: list[str], chunks: int = 3) -> PidFilter:
    arrays = np.array_split(np.array(pids, dtype=object), chunks)
    return PidFilter.build(len(pids), (key_hashes(pa.array(list(a))) for a in arrays))


def test_every_pid_passes_and_few_others_do():
    needed = [f"en:{i}-{i % 7}" for i in range(0, 40_000, 2)]  # 20k pids
    others = [f"en:{i}-{i % 7}" for i in range(1, 200_001, 2)]  # 100k pids not in it
    keep = _filter(needed)
    assert keep.m >= BITS_PER_PID * len(needed) and keep.m % 8 == 0
    assert keep.contains(pa.array(needed)).all()  # no false negatives
    assert keep.contains(pa.chunked_array([needed[:5], needed[5:9]])).all()
    rate = keep.contains(pa.array(others)).mean()
    assert rate < 0.02  # about 1% at 10 bits and 7 hashes
    assert keep.contains(pa.array([], pa.string())).shape == (0,)


def test_odd_sizes_and_an_undersized_filter_drop_no_needed_pid():
    for n in (1, 3, 13, 1001):  # bit counts not a multiple of 64
        pids = [f"p{i}" for i in range(n)]
        assert _filter(pids, chunks=2).contains(pa.array(pids)).all()
    pids = [f"q{i}" for i in range(5000)]
    small = PidFilter.build(100, [key_hashes(pa.array(pids))])  # 50x more pids than sized
    assert small.contains(pa.array(pids)).all()


def test_hashes_are_the_same_in_another_process():
    """Workers test pids against a filter built on the driver: the hash must not be salted
    per process (Python's ``hash`` of a str is)."""
    pids = ["en:1-0", "zh:文章-3", "", "th:๑-2"]
    code = ("import pyarrow as pa; from qgscale.data.pidfilter import key_hashes; "
            f"print(key_hashes(pa.array({pids!r})).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert eval(out.stdout) == key_hashes(pa.array(pids)).tolist()
