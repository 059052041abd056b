"""``kdscale train``: train the student on token shards, distilling from a cache.

    kdscale train --config student.yaml --tokens runs/tokens --cache runs/cache --out runs/s
    torchrun --nproc-per-node 8 -m kdscale.train.stage --config student.yaml   # same thing

Everything is checked first (layout, batch split, cache fingerprints, vocab, temperature, a
resumed run's inputs); then, outside torchrun with ``train.nproc_per_node`` > 1, this command
starts that many local ranks itself (:mod:`kdscale.train.launch`); otherwise it trains in this
process as one rank of the world the environment describes (a world of one without torchrun).
Running the same command again resumes from the newest checkpoint in ``train.out``.

``train.engine`` picks the engine: ``megatron`` (:mod:`kdscale.train.trainer`, any
tensor × pipeline × data layout) or ``deepspeed`` (:mod:`kdscale.train.zero`, a transformers
student under DeepSpeed ZeRO, data parallel only); checks, launching and resuming are the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kdscale.config import KDScaleConfig, write_resolved_config


def run(cfg: KDScaleConfig) -> int:
    """Check the run, then train here or on local ranks; returns a process exit status."""
    from kdscale.train.checks import check_run

    under_launcher = "RANK" in os.environ
    nproc = cfg.train.nproc_per_node
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if under_launcher else nproc
    if cfg.train.engine == "deepspeed":
        from kdscale.train.zero.checks import check_zero_run

        cfg, inputs, start = check_zero_run(cfg, world_size)  # architecture of the start
    else:
        inputs = check_run(cfg, world_size)
    if not under_launcher and nproc > 1:
        from kdscale.train.launch import launch_local

        config = write_resolved_config(cfg, Path(cfg.train.out))
        return launch_local(["train", "--config", str(config)], nproc)
    if cfg.train.engine == "deepspeed":
        from kdscale.train.zero.trainer import train_zero

        return train_zero(cfg, inputs, start)
    from kdscale.train.trainer import train

    return train(cfg, inputs)


def main() -> int:
    """``python -m kdscale.train.stage ARGS`` ≡ ``kdscale train ARGS`` (for torchrun)."""
    from kdscale.cli import main as cli_main

    return cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
