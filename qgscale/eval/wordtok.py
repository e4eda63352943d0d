"""NLTK's ``word_tokenize`` with no data download: the tokens of XOR-TyDi's R@kt.

XOR-TyDi's ``eval_xor_retrieve.py`` counts ``nltk.tokenize.word_tokenize(ctx_text)`` tokens:
Punkt sentence splitting with NLTK's English model, then NLTK's Treebank-style word tokenizer
per sentence. :func:`word_tokenize` is that function with the English Punkt parameters read
from the package (``qgscale/resources/punkt_tab``, NLTK's ``punkt_tab`` files, MIT; see its
SOURCE.md) instead of an ``nltk_data`` folder, so the tokens are the official script's.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


def punkt_dir() -> str:
    return str(resources.files("qgscale") / "resources" / "punkt_tab" / "english")


@lru_cache(maxsize=1)
def _tokenizers():
    from nltk.tabdata import PunktDecoder
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    # what nltk.tokenize.punkt.load_punkt_params reads (its path checks refuse a folder
    # outside nltk_data, hence the files opened here)
    dec, params = PunktDecoder(), PunktParameters()
    with open(f"{punkt_dir()}/collocations.tab", encoding="utf-8") as f:
        params.collocations = set(dec.tab2tups(f))
    with open(f"{punkt_dir()}/sent_starters.txt", encoding="utf-8") as f:
        params.sent_starters = dec.txt2set(f)
    with open(f"{punkt_dir()}/abbrev_types.txt", encoding="utf-8") as f:
        params.abbrev_types = dec.txt2set(f)
    with open(f"{punkt_dir()}/ortho_context.tab", encoding="utf-8") as f:
        params.ortho_context = dec.tab2intdict(f)
    return PunktSentenceTokenizer(params), NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (English, ``preserve_line=False``)."""
    sents, words = _tokenizers()
    return [t for s in sents.tokenize(text) for t in words.tokenize(s)]


def line_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text, preserve_line=True)``: no sentence split."""
    return _tokenizers()[1].tokenize(text)
