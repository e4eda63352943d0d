"""Evaluation: retrieval metrics and the evaluation job (``python -m qgscale.eval``)."""
