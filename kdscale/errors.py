"""User-facing errors: one line that says what is wrong, where, and what to do next.

Every stage raises :class:`KDScaleError` for bad input (a missing file, a bad config value, a
corrupt shard, a mismatched fingerprint). The CLI prints its message on one line and exits
with status 2; internal invariants use ``assert`` instead. Anything else that reaches the CLI
is still one line (:func:`describe_failure`: a full disk, an unreadable path, a dead Ray actor,
or an internal error), with the traceback saved to a file the line names.
"""

import argparse
import errno
from collections.abc import Iterator
from typing import NoReturn


class KDScaleError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for subcommands that parse their own flags: a bad flag is a KDScaleError (one
    line, exit 2) instead of argparse's usage dump and exit."""

    def error(self, message: str) -> NoReturn:
        raise KDScaleError(message)


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is below {low}")
    return value


_FULL = (errno.ENOSPC, errno.EDQUOT)
_ACTOR_DIED = ("ActorDiedError", "RayActorError", "ActorUnavailableError")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line for an exception that is not a :class:`KDScaleError`, and the exit status:
    2 for the environment (a full disk, a path that cannot be written, a dead Ray actor),
    1 for an internal error."""
    chain = list(_chain(exc))
    for cause in chain:
        full = isinstance(cause, OSError) and cause.errno in _FULL
        # (torch's checkpoint writers report a worker's OSError as text, in a BaseException)
        if full or any(f"[Errno {code}]" in str(cause) for code in _FULL):
            filename = getattr(cause, "filename", None)
            where = f" writing {filename!r}" if filename else ""
            return (f"no space left on device{where}: free space (or choose another output "
                    "directory), then run the same command again"), 2
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror:
            where = f": {cause.filename!r}" if cause.filename else ""
            return f"{cause.strerror}{where}", 2
    for cause in chain:
        if type(cause).__name__ in _ACTOR_DIED:
            return f"a Ray actor died: {_first_line(cause)}", 2
    return f"internal error: {type(exc).__name__}: {_first_line(exc)}", 1
