"""Dense index: corpus encoding, distributed FAISS build, sharded search, candidate mining.

The names below are imported on first use, so that a process building or searching an index
(``qgscale.index.build`` / ``search``) does not import torch with the encoder."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"build_index": "build", "run_build": "build", "encode_corpus": "encode",
          "run_encode": "encode", "run_mine": "mine", "ShardedSearcher": "search",
          "load_index": "search"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'qgscale.index' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qgscale.index.{_WHERE[name]}"), name)
