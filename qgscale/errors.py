"""User errors: bad config, bad data, a missing input or stage output.

Every error a user can fix without touching the code is a :class:`QgscaleError`; its message
names the file or URI and the key, line or id at fault. The command line reports one as a
single line (``qgscale: error: <message>``, exit code 2) instead of a traceback; any other
exception is a bug and keeps its traceback.
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


def unwrap(e: BaseException) -> BaseException:
    """The original exception inside Ray's task-error wrappers (``RayTaskError.cause``)."""
    for _ in range(10):
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e


def user_error(exc: BaseException) -> BaseException | None:
    """The user error behind ``exc``, or None when ``exc`` is a bug.

    Looks through Ray's task-error wrappers (``.cause``) and explicit ``raise ... from``
    chains for a :class:`QgscaleError`, so one raised inside a Ray task is still reported as
    one line. A pydantic ``ValidationError`` (a config model built outside
    :func:`qgscale.config.load`) and a plain ``FileNotFoundError`` (stage modules that still
    raise it for a missing stage output) count as user errors too, when they are the error
    itself rather than the cause of another one.
    """
    from pydantic import ValidationError

    top = unwrap(exc)
    e: BaseException | None = top
    for _ in range(20):
        if e is None:
            break
        e = unwrap(e)
        if isinstance(e, QgscaleError):
            return e
        e = e.__cause__
    return top if isinstance(top, FileNotFoundError | ValidationError) else None


def one_line(exc: BaseException) -> str:
    """The message of a user error on one line (a config with several bad keys lists them
    separated by ``; ``)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                 for e in exc.errors()]
        text = f"{exc.title}: " + "; ".join(lines)
    elif isinstance(exc, FileNotFoundError) and not isinstance(exc, QgscaleError) \
            and exc.filename:
        text = f"{exc.filename}: {exc.strerror or 'not found'}"
    else:
        text = str(exc) or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def report(exc: BaseException, prog: str = "qgscale") -> int | None:
    """Print a user error as ``<prog>: error: <message>`` on stderr and return exit code 2;
    None (nothing printed) when ``exc`` is not a user error."""
    import sys

    err = user_error(exc)
    if err is None:
        return None
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2
