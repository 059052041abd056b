"""Progress of long stages: tqdm's bar on a terminal, a log line at a steady interval elsewhere.

    with progress_bar("caching", total=len(todo), unit="shard") as bar:
        bar.update(1, tokens=record.tokens)
    for batch in track(batches, "scoring", unit="batch", tokens_of=lambda b: b.numel()):
        ...

When stderr is a terminal this is a tqdm bar (with tokens/s beside it). When it is not (a log
file, a batch job, a pipe) tqdm draws nothing, so a timer thread logs one line every
``KDSCALE_PROGRESS_SECONDS`` seconds (default 30) — also while one long item is in flight — and
a last one at the end if any was written::

    caching: 3/10 shard (30%) | 12,345 tok/s | elapsed 01:30 | ETA 03:30

Only processes that log at INFO (rank 0 of a job) draw bars or write lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

from kdscale.logging import get_logger, stderr_is_terminal

log = get_logger(__name__)

INTERVAL_ENV = "KDSCALE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0

T = TypeVar("T")


def interval_seconds() -> float:
    """Seconds between progress lines (``$KDSCALE_PROGRESS_SECONDS``, default 30)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return max(float(raw), 0.01) if raw else DEFAULT_INTERVAL
    except ValueError:
        log.warning(
            "%s=%r is not a number of seconds; using %s", INTERVAL_ENV, raw, DEFAULT_INTERVAL
        )
        return DEFAULT_INTERVAL


class ProgressBar:
    """Counts units (and the tokens in them) done out of ``total``; shows them as a bar or as
    periodic log lines. ``initial``: units already done before (a resumed run); the rate and
    ETA count only what this process does."""

    def __init__(
        self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
        leave: bool = True,
    ) -> None:  # fmt: skip
        self.desc, self.total, self.unit = desc, total, unit
        self.done, self.initial, self.tokens = initial, initial, 0
        self.started = time.monotonic()
        self.lines = 0
        self._bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not log.isEnabledFor(logging.INFO):
            return
        if stderr_is_terminal():
            self._bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                unit_scale=unit == "tok", dynamic_ncols=True,
            )  # fmt: skip
        else:
            self._interval = interval_seconds()
            self._thread = threading.Thread(target=self._beat, name="kdscale-progress", daemon=True)
            self._thread.start()

    def update(self, n: int = 1, tokens: int = 0) -> None:
        """``n`` more units done, holding ``tokens`` tokens."""
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            if tokens and self.unit != "tok":
                self._bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tok/s", refresh=False)
            self._bar.update(n)

    def count(self, items: Iterable[T], tokens_of: Callable[[T], int] | None = None) -> Iterator[T]:
        """Yield ``items``, counting each (and its ``tokens_of(item)`` tokens) when handed out."""
        for item in items:
            self.update(1, tokens_of(item) if tokens_of is not None else 0)
            yield item

    def tokens_per_s(self) -> float:
        """Tokens per second since this object was made."""
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        """``desc: done/total unit (pct) | rate | elapsed | ETA``."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = tqdm.format_sizeof(self.done) if self.unit == "tok" else f"{self.done:,}"
        parts = [f"{self.desc}: {done}"]
        if self.total:
            parts[0] += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{self.tokens_per_s():,.0f} tok/s")
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        per_s = (self.done - self.initial) / elapsed
        if self.total:
            left = self.total - self.done
            eta = tqdm.format_interval(left / per_s) if per_s > 0 else "?"
            parts.append(f"ETA {eta if left > 0 else '00:00'}")
        return " | ".join(parts)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            log.info("%s", self.line())
            self.lines += 1

    def close(self) -> None:
        """Remove the bar, or stop the timer (and log the last line if any was written)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self.lines:
                log.info("%s", self.line())

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(
    desc: str, total: int | None = None, unit: str = "it", initial: int = 0, leave: bool = True
) -> ProgressBar:
    """A :class:`ProgressBar` (use it as a context manager)."""
    return ProgressBar(desc, total, unit, initial, leave)


def track(
    items: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    unit: str = "it",
    tokens_of: Callable[[T], int] | None = None,
    leave: bool = True,
) -> Iterator[T]:
    """Yield ``items``, counted (with ``tokens_of(item)`` tokens) in a :class:`ProgressBar`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(desc, total, unit, leave=leave) as bar:
        yield from bar.count(items, tokens_of)
