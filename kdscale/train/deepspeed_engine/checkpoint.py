"""DeepSpeed checkpoints in kdscale's run layout, so ``train.resume`` and the checks work as for
megatron runs::

    <out>/checkpoints/latest                text file naming the newest complete checkpoint
    <out>/checkpoints/step_000000100/       DeepSpeed's files: *model_states.pt (weights; at
        *_optim_states.pt                   ZeRO-3 one per rank) and the ZeRO optimizer
                                            partitions, one per data-parallel rank
        model.yaml, config.yaml             the model section and the run's resolved config
        train_state.json                    engine, ZeRO stage, step, consumed samples/tokens,
                                            LR schedule, world size, inputs
        rng/dp0.pt                          each rank's torch RNG state
        checksums.json                      every other file's size and sha256, written last

DeepSpeed writes into ``.step_N.tmp`` (its "tag"); the ranks hash it, rank 0 adds the small files
and ``checksums.json``, renames the directory and then rewrites ``latest``, exactly as
:mod:`kdscale.train.checkpoint` does, so a crash at any point leaves the previous checkpoint as
the latest. A resume verifies the checksums first: DeepSpeed loads its ``*.pt`` files with
pickle, so a damaged or foreign file must never reach it. Progress also travels in
DeepSpeed's ``client_state``. A checkpoint resumes at the same data-parallel size and ZeRO
stage (DeepSpeed's partitioned optimizer files are per rank).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdscale.config import KDScaleConfig
from kdscale.io import atomic_open, removed_on_failure
from kdscale.models.checkpoints import (
    CHECKPOINTS,
    checkpoint_digests,
    read_train_state,
    step_name,
    verify_checkpoint,
)
from kdscale.train.checkpoint import Progress, load_plain_state, publish_checkpoint

ENGINE = "deepspeed"


def _rng_file(root: Path) -> Path:
    return root / "rng" / f"dp{dist.get_rank()}.pt"


def save_zero_checkpoint(
    cfg: KDScaleConfig, progress: Progress, engine: Any, scheduler: Any, inputs: dict[str, Any]
) -> Path:
    """Save this step atomically (collective: every rank calls it)."""
    root = Path(cfg.train.out) / CHECKPOINTS
    name = step_name(progress.step)
    tag, final = f".{name}.tmp", root / name
    tmp = root / tag
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    with removed_on_failure(tmp):
        engine.save_checkpoint(
            str(root), tag=tag, client_state={"progress": asdict(progress)}, save_latest=False
        )
        rng = _rng_file(tmp)
        rng.parent.mkdir(exist_ok=True)
        with atomic_open(rng) as handle:
            torch.save({"torch": torch.get_rng_state()}, handle)
        dist.barrier()
        digests = checkpoint_digests(tmp)
        if rank0:
            state = {
                "engine": ENGINE,
                "zero_stage": cfg.train.deepspeed.zero_stage,
                "optimizer_state": True,
                "layout": {"tensor": 1, "pipeline": 1, "virtual_pipeline": None,
                           "data": dist.get_world_size()},
            }  # fmt: skip
            publish_checkpoint(cfg, progress, scheduler, inputs | state, tmp, final, digests)
    dist.barrier()
    return final


def load_zero_checkpoint(ckpt: Path, engine: Any, scheduler: Any, verify: bool = True) -> Progress:
    """Restore weights, optimizer state, the schedule position and this rank's RNG, after
    verifying the checkpoint's checksums (collective; ``verify=False``: the explicit opt-out)."""
    verify_checkpoint(ckpt, verify)
    state = read_train_state(ckpt)
    _, client = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )  # fmt: skip
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_plain_state(_rng_file(ckpt))["torch"])
    return Progress(**client["progress"])
