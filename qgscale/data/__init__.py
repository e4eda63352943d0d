"""Data: canonical parquet formats, readers/converters and shard IO."""
