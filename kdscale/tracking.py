"""Stage monitoring in one place: a W&B run per stage, or a no-op with the same interface.

    tracker = start_tracking(cfg.wandb, job_type="cache", run_dir=out, config=cfg.model_dump())
    tracker.log({"cache/tokens_per_s": 1.2e4}, step=3)
    tracker.finish()

W&B runs offline when no API key is set (``mode: auto``), so logging never needs the network.
Only rank 0 of a distributed job should create a tracker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from kdscale.config.tracking import WandbConfig


class Tracker(Protocol):
    """What stages log through."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Disabled tracking: same interface, does nothing."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Drop the metrics."""

    def summary(self, values: dict[str, Any]) -> None:
        """Drop the values."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbTracker:
    """A live W&B run."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalars at ``step``."""
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Record final values in the run summary."""
        self.run.summary.update(values)

    def finish(self) -> None:
        """Close the run (flushes offline files)."""
        self.run.finish()


def resolve_mode(cfg: WandbConfig) -> str:
    """``online`` or ``offline``: ``auto`` goes online only when an API key is present."""
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_tracking(
    cfg: WandbConfig, job_type: str, run_dir: str | Path, config: dict[str, Any], name: str | None = None
) -> Tracker:
    """Start a W&B run for one stage (``job_type`` = stage name), or a :class:`NullTracker`."""
    if not cfg.enabled:
        return NullTracker()
    import wandb

    directory = Path(cfg.dir or run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        job_type=job_type,
        name=name,
        tags=cfg.tags,
        dir=str(directory),
        mode=resolve_mode(cfg),
        config=config,
        reinit="finish_previous",
    )
    return WandbTracker(run)
