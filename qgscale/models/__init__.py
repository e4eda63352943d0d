"""Models: the query-generator teacher and the dual-encoder student."""
