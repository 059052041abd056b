"""User-facing errors: one line that says what is wrong, where, and what to do next.

Every stage raises :class:`KDScaleError` for bad input (a missing file, a bad config value, a
corrupt shard, a mismatched fingerprint). The CLI prints its message on one line and exits
with status 2; internal invariants use ``assert`` instead.
"""


class KDScaleError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 2
