"""``kdscale train``: train the student on token shards, distilling from a cache.

    kdscale train --config student.yaml --tokens runs/tokens --cache runs/cache --out runs/s
    torchrun --nproc-per-node 8 -m kdscale.cli train --config student.yaml   # same thing

Everything is checked first (layout, batch split, cache fingerprints, vocab, temperature, a
resumed run's inputs); then, outside torchrun with ``train.nproc_per_node`` > 1, this command
starts that many local ranks itself (:mod:`kdscale.train.launch`); otherwise it trains in this
process as one rank of the world the environment describes (a world of one without torchrun).
Running the same command again resumes from the newest checkpoint in ``train.out``.

One run writes a ``train.out`` at a time: the command (rank 0 under torchrun; the launching
process, for its local ranks) holds ``train.out/.lock`` for the whole run, and a second run is
refused in one line.

``train.engine`` picks the engine the shared loop (:mod:`kdscale.train.loop`) drives: ``megatron``
(:mod:`kdscale.train.megatron_engine`, any tensor × pipeline × data layout) or ``deepspeed``
(:mod:`kdscale.train.deepspeed_engine`, a transformers student under DeepSpeed ZeRO, data
parallel only); checks, launching, resuming and metrics are the same.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from kdscale.config import KDScaleConfig, ParallelConfig, write_resolved_config
from kdscale.errors import KDScaleError
from kdscale.locks import exclusive_directory
from kdscale.train.checks import RunInputs

# Set by the launching process for its local ranks: the train.out whose lock it holds.
LOCK_HELD_ENV = "KDSCALE_TRAIN_LOCK_HELD"


def run(cfg: KDScaleConfig) -> int:
    """Check the run, then train here or on local ranks; returns a process exit status."""
    under_launcher = "RANK" in os.environ
    nproc = cfg.train.nproc_per_node
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if under_launcher else nproc
    if not cfg.train.out:
        raise KDScaleError("train.out: required (the run directory, e.g. --out runs/student)")
    with _only_writer(Path(cfg.train.out)):
        cfg, inputs, parallel, build_engine = _checked(cfg, world_size)
        if not under_launcher and nproc > 1:
            from kdscale.train.launch import launch_local

            config = write_resolved_config(cfg, Path(cfg.train.out))
            held = {LOCK_HELD_ENV: str(Path(cfg.train.out).resolve())}
            return launch_local(["train", "--config", str(config)], nproc, env=held)
        from kdscale.train.loop import train

        return train(cfg, inputs, parallel, build_engine)


@contextlib.contextmanager
def _only_writer(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock unless another rank of this run (or its launcher) holds it."""
    held_by_launcher = os.environ.get(LOCK_HELD_ENV) == str(out.resolve())
    if os.environ.get("RANK", "0") != "0" or held_by_launcher:
        yield
        return
    with exclusive_directory(out, "train.out", "kdscale train"):
        yield


def _checked(
    cfg: KDScaleConfig, world_size: int
) -> tuple[KDScaleConfig, RunInputs, ParallelConfig, Callable]:
    """The run's config, checked inputs, the layout its process groups need, and how to build
    its engine."""
    if cfg.train.engine == "deepspeed":
        from kdscale.train.deepspeed_engine.checks import check_deepspeed_run
        from kdscale.train.deepspeed_engine.engine import DeepSpeedEngine

        cfg, inputs, start = check_deepspeed_run(cfg, world_size)  # the start's architecture
        # Data parallel only; megatron's (TP=1) groups serve loading kdscale model directories.
        return cfg, inputs, ParallelConfig(), lambda: DeepSpeedEngine(cfg, inputs, start)
    from kdscale.train.checks import check_run
    from kdscale.train.megatron_engine import MegatronEngine, check_megatron_run

    check_megatron_run(cfg, world_size)
    inputs = check_run(cfg, world_size)
    return cfg, inputs, cfg.parallel, lambda: MegatronEngine(cfg, inputs)
