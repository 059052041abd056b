"""Logging set up once, in one place (rank-aware: only rank 0 logs at INFO)."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stderr`` of that moment, not the one at set-up (test
    harnesses and W&B's console capture replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int | None = None) -> None:
    """Configure the root ``kdscale`` logger; non-zero ranks log warnings only."""
    rank = int(os.environ.get("RANK", "0"))
    if level is None:
        level = logging.INFO if rank == 0 else logging.WARNING
    logger = logging.getLogger("kdscale")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def get_logger(name: str) -> logging.Logger:
    """A child of the ``kdscale`` logger."""
    return logging.getLogger(name if name.startswith("kdscale") else f"kdscale.{name}")
