"""Sparse retrieval (BM25 over sharded corpora) and answer-match training data."""
