"""User errors: bad config, bad data, a missing input or stage output.

Every error a user can fix without touching the code is a :class:`QgscaleError`; its message
names the file or URI and the key, line or id at fault.
"""

from __future__ import annotations


class QgscaleError(Exception):
    """A user error: bad config, bad data, or a missing input / stage output."""


class DataError(QgscaleError, ValueError):
    """Bad input data: the message names file (or URI), line or row, and field or id."""


class ConfigError(QgscaleError, ValueError):
    """A bad config file, key or value (or a bad command-line option value)."""


class MissingInputError(QgscaleError, FileNotFoundError):
    """An input file, or the output of an earlier stage, does not exist."""
