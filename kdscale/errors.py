"""User-facing errors: one line that says what is wrong, where, and what to do next.

Every stage raises :class:`KDScaleError` for bad input (a missing file, a bad config value, a
corrupt shard, a mismatched fingerprint). The CLI prints its message on one line and exits
with status 2; internal invariants use ``assert`` instead.
"""

import argparse
from typing import NoReturn


class KDScaleError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for subcommands that parse their own flags: a bad flag is a KDScaleError (one
    line, exit 2) instead of argparse's usage dump and exit."""

    def error(self, message: str) -> NoReturn:
        raise KDScaleError(message)
