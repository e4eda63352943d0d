"""Device and precision for the plain-torch fast paths (no Ray here).

:func:`autocast` is the one autocast helper of qgscale (teacher scoring/generation in
:mod:`qgscale.models.generator`, encoding in :mod:`qgscale.index.encode`); Ray actors get
their device from :func:`qgscale.runtime.actor_device`, which checks it against the
resources Ray gave them.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device: torch.device | str, precision: str = "fp32"):
    """``torch.autocast`` in bf16/fp16 on CUDA; a no-op on CPU or for fp32 (results stay
    exact there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)
