"""Readers that convert raw datasets into qgscale's canonical tables."""

from __future__ import annotations

import gzip
import json
from importlib import resources

XQUAD_LANGS = ["ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"]


def bundled(name: str) -> str:
    """Path of a data folder bundled in the package (``xquad``, ``tatoeba``, ``mkqa``)."""
    return str(resources.files("qgscale") / "resources" / name)


def bundled_xquad_texts(langs: list[str] | None = None) -> list[str]:
    """Questions and paragraphs of the bundled XQuAD files, interleaved by language."""
    out: list[str] = []
    for lang in langs or XQUAD_LANGS:
        with gzip.open(f"{bundled('xquad')}/xquad.{lang}.json.gz", "rt", encoding="utf-8") as f:
            data = json.load(f)["data"]
        for article in data:
            for para in article["paragraphs"]:
                out.append(para["context"])
                out.extend(qa["question"] for qa in para["qas"])
    return out
