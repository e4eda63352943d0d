"""Dense index: corpus encoding, distributed FAISS build, sharded search, candidate mining."""

from qgscale.index.build import build_index, run_build
from qgscale.index.encode import encode_corpus, run_encode
from qgscale.index.mine import mine, run_mine
from qgscale.index.search import ShardedSearcher, load_index, search

__all__ = ["ShardedSearcher", "build_index", "encode_corpus", "load_index", "mine",
           "run_build", "run_encode", "run_mine", "search"]
