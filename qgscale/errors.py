"""User errors: bad config, bad data, a missing input. The CLI prints them as one line."""

from __future__ import annotations


class QgscaleError(Exception):
    """An error the user can fix (config, data, a stage output that is not there)."""


class ConfigError(QgscaleError, ValueError):
    """A config that does not validate, naming the file and key path."""


class DataError(QgscaleError, ValueError):
    """Bad input data, naming file, line and field."""


class MissingInputError(QgscaleError, FileNotFoundError):
    """A stage input or output that does not exist (naming the URI or the stage to run)."""
