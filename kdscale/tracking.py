"""Stage monitoring in one place: a W&B run per stage, or a no-op with the same interface.

    tracker = start_tracking(cfg.wandb, job_type="cache", run_dir=out, config=cfg.model_dump())
    tracker.log({"cache/tokens_per_s": 1.2e4}, step=3)
    tracker.finish()

W&B runs offline when no API key is set (``mode: auto``), so logging never needs the network.
Only rank 0 of a distributed job should create a tracker.

``kdscale run`` opens each stage's run itself (:func:`stage_tracking`) so that it can record the
artifacts the stage read and wrote; inside it, the stage's own :func:`start_tracking` returns
that run instead of starting a second one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kdscale.config.tracking import WandbConfig


class Tracker(Protocol):
    """What stages log through."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...

    def log_artifact(self, artifact: "ArtifactSpec") -> None: ...

    def use_artifact(self, artifact: "ArtifactSpec") -> None: ...


@dataclass(frozen=True)
class ArtifactSpec:
    """A stage output as a W&B artifact: its small describing files, and the directory's path in
    the metadata (shards, checkpoints and weights are neither uploaded nor walked).

    Built the same way by the stage that writes it and by the stages that read it, so both name
    the same content (W&B deduplicates artifact versions by digest).
    """

    name: str
    type: str
    directory: Path
    files: tuple[Path, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """The ``wandb.Artifact``."""
        import wandb

        metadata = self.metadata | {"directory": str(self.directory.resolve())}
        artifact = wandb.Artifact(self.name, type=self.type, metadata=metadata)
        for path in self.files:
            artifact.add_file(str(path), name=path.relative_to(self.directory).as_posix())
        return artifact


class NullTracker:
    """Disabled tracking: same interface, does nothing."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Drop the metrics."""

    def summary(self, values: dict[str, Any]) -> None:
        """Drop the values."""

    def finish(self) -> None:
        """Nothing to close."""

    def log_artifact(self, artifact: ArtifactSpec) -> None:
        """Drop the artifact."""

    def use_artifact(self, artifact: ArtifactSpec) -> None:
        """Drop the input."""


class WandbTracker:
    """A live W&B run."""

    def __init__(self, run: Any, offline: bool = False):
        self.run = run
        self.offline = offline

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalars at ``step``."""
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Record final values in the run summary."""
        self.run.summary.update(values)

    def finish(self) -> None:
        """Close the run (flushes offline files)."""
        self.run.finish()

    def log_artifact(self, artifact: ArtifactSpec) -> None:
        """Record a stage output as an artifact this run produced."""
        self.run.log_artifact(artifact.build())

    def use_artifact(self, artifact: ArtifactSpec) -> None:
        """Record a stage input. W&B links inputs only online; offline, the input's name and
        directory go into the run's config (``lineage.inputs``) instead."""
        if not self.offline:
            self.run.use_artifact(artifact.build())
            return
        inputs = dict(self.run.config.get("lineage", {}).get("inputs", {}))
        inputs[artifact.name] = {"type": artifact.type, "directory": str(artifact.directory)}
        self.run.config.update({"lineage": {"inputs": inputs}}, allow_val_change=True)


class BorrowedTracker(WandbTracker):
    """The run ``kdscale run`` opened for a stage, as that stage sees it: it logs into the run
    and adds to its config, but the runner finishes it."""

    def __init__(self, owner: WandbTracker, config: dict[str, Any]):
        super().__init__(owner.run, owner.offline)
        self.run.config.update(config, allow_val_change=True)

    def finish(self) -> None:
        """Leave the run open for the runner."""


# The run `kdscale run` opened for the stage now running in this process.
_stage_run: WandbTracker | None = None


def resolve_mode(cfg: WandbConfig) -> str:
    """``online`` or ``offline``: ``auto`` goes online only when an API key is present."""
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def start_tracking(
    cfg: WandbConfig, job_type: str, run_dir: str | Path, config: dict[str, Any], name: str | None = None
) -> Tracker:
    """Start a W&B run for one stage (``job_type`` = stage name), or a :class:`NullTracker`
    (inside :func:`stage_tracking`: that run)."""
    if not cfg.enabled:
        return NullTracker()
    if _stage_run is not None:
        return BorrowedTracker(_stage_run, config)
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
    return WandbTracker(run, offline=resolve_mode(cfg) == "offline")


@contextmanager
def stage_tracking(
    cfg: WandbConfig, job_type: str, run_dir: str | Path, config: dict[str, Any], name: str
) -> Iterator[Tracker]:
    """Open the run of one recipe stage; the stage's own tracking logs into it; finish it."""
    global _stage_run
    tracker = start_tracking(cfg, job_type, run_dir, config, name=name)
    _stage_run = tracker if isinstance(tracker, WandbTracker) else None
    try:
        yield tracker
    finally:
        _stage_run = None
        tracker.finish()
