"""Training checkpoints: the weights plus what a run resumes from — optimizer state, the schedule,
progress and RNG streams. The directory format (names, finding the latest, reading metadata,
loading weights) is :mod:`kdscale.models.checkpoints`; training adds::

    <out>/checkpoints/step_000000100/
        <dist_checkpointing shards>          model and optimizer state
        rng/tp0-pp0-dp0.pt                   each rank's RNG streams (plain tensors: loaded with
                                             ``torch.load(weights_only=True)``)
        checksums.json                       every other file's size and sha256, written last

Saves are atomic: every rank writes into ``.step_N.tmp``; only when all are done do the ranks
hash what they wrote (each a share) and rank 0 add the small files and ``checksums.json``,
rename the directory to ``step_N`` and then rewrite ``latest`` (itself atomically). A resume
verifies the checksums before it loads anything. A crash at any point leaves the previous checkpoint as the latest; leftovers of an
interrupted save are deleted by the next one. Tensors are stored by their global names and
shapes, so a checkpoint loads at any tensor/pipeline/data-parallel layout; RNG streams are
restored only at the layout that saved them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.errors import KDScaleError
from kdscale.io import atomic_open, atomic_write_text, fsync_dir, removed_on_failure
from kdscale.logging import get_logger
from kdscale.integrity import write_checksums
from kdscale.models.checkpoints import (
    CHECKPOINTS,
    LATEST,
    MODEL_CONFIG,
    STATE,
    checkpoint_digests,
    complete_steps,
    model_sharded_state,
    read_train_state,
    step_name,
    verify_checkpoint,
)

log = get_logger(__name__)

# The distributed optimizer's layout-independent format (per-parameter tensors).
_OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


@dataclass
class Progress:
    """Where training stands: the state a resumed run continues from."""

    step: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    source_samples: dict[str, int] = field(default_factory=dict)  # a blend's samples per source


def _layout() -> dict[str, int | None]:
    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "data": parallel_state.get_data_parallel_world_size(),
    }


def _rng_file(root: Path) -> Path:
    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    dp = parallel_state.get_data_parallel_rank()
    return root / "rng" / f"tp{tp}-pp{pp}-dp{dp}.pt"


def _rng_state() -> dict[str, Any]:
    """Every RNG stream as tensors and plain values (nothing a weights-only load refuses)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "state": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["state"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def load_plain_state(path: Path) -> dict[str, Any]:
    """A file of tensors and plain values (``weights_only``: a pickled object is refused, never
    run); anything else is one line naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KDScaleError(f"{path}: not a kdscale RNG state file ({first})") from None


def _sharded_state(
    chunks: list[GPTModel], optimizer: MegatronOptimizer | None, loading: bool
) -> dict[str, Any]:
    model = model_sharded_state(chunks)
    if optimizer is None:
        return model
    return model | {
        "optimizer": optimizer.sharded_state_dict(
            model, is_loading=loading, metadata=_OPTIMIZER_METADATA
        )
    }


def save_checkpoint(
    cfg: KDScaleConfig,
    progress: Progress,
    chunks: list[GPTModel],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    inputs: dict[str, Any],
) -> Path:
    """Save a checkpoint of this step atomically (collective: every rank calls it)."""
    root = Path(cfg.train.out) / CHECKPOINTS
    name = step_name(progress.step)
    tmp, final = root / f".{name}.tmp", root / name
    rank0 = dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with removed_on_failure(tmp):
        # Adam has no state before its first step; such a checkpoint holds the weights only.
        with_optimizer = progress.step > 0
        dist_checkpointing.save(
            _sharded_state(chunks, optimizer if with_optimizer else None, loading=False), str(tmp)
        )
        rng = _rng_file(tmp)
        rng.parent.mkdir(exist_ok=True)
        with atomic_open(rng) as handle:
            torch.save(_rng_state(), handle)
        dist.barrier()
        digests = checkpoint_digests(tmp)
        if rank0:
            state = {"optimizer_state": with_optimizer, "layout": _layout()}
            publish_checkpoint(cfg, progress, scheduler, inputs | state, tmp, final, digests)
    dist.barrier()
    return final


def publish_checkpoint(
    cfg: KDScaleConfig,
    progress: Progress,
    scheduler: OptimizerParamScheduler,
    state: dict[str, Any],
    tmp: Path,
    final: Path,
    digests: dict[str, dict[str, Any]],
) -> None:
    """Rank 0, once every rank's shards are in ``tmp`` (and hashed: ``digests``): add the model
    section, the resolved config, ``train_state.json`` (progress, schedule, world, seed, plus
    ``state``) and ``checksums.json``, rename ``tmp`` to ``final``, point ``latest`` at it and
    drop checkpoints beyond ``train.keep_checkpoints``. A crash at any point leaves the previous
    checkpoint latest."""
    atomic_write_text(tmp / MODEL_CONFIG, yaml.safe_dump(cfg.model.model_dump(mode="json")))
    write_resolved_config(cfg, tmp)
    train_state = asdict(progress) | {
        "scheduler": scheduler.state_dict(),
        "world_size": dist.get_world_size(),
        "seed": cfg.train.seed,
        "time": time.time(),
        **state,
    }
    atomic_write_text(tmp / STATE, json.dumps(train_state, indent=2) + "\n")
    write_checksums(tmp, digests)
    _commit(tmp, final)
    atomic_write_text(final.parent / LATEST, final.name + "\n")
    _prune(final.parent, cfg.train.keep_checkpoints, keep=final)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished directory into place (replacing a stale one of the same step)."""
    for directory in (tmp / "rng", tmp):
        fsync_dir(directory)  # every entry is on disk before the rename publishes them
    stale = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(stale, ignore_errors=True)


def _prune(root: Path, keep_last: int | None, keep: Path) -> None:
    if keep_last is None:
        return
    for old in complete_steps(root)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_interrupted_saves(out: str | Path) -> None:
    """Delete temp directories of saves that never finished (rank 0, before training)."""
    root = Path(out) / CHECKPOINTS
    for tmp in root.glob(".step_*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    ckpt: Path,
    chunks: list[GPTModel],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    verify: bool = True,
) -> Progress:
    """Restore weights, optimizer, schedule position and (same layout only) RNG streams, after
    verifying the checkpoint's checksums (collective; ``verify=False``: the explicit opt-out)."""
    verify_checkpoint(ckpt, verify)
    state = read_train_state(ckpt)
    optimizer_state = optimizer if state["optimizer_state"] else None
    loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer_state, True), str(ckpt))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])
    if optimizer_state is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    else:
        optimizer.reload_model_params()  # fp32 main weights from the loaded bf16 ones
    scheduler.load_state_dict(state["scheduler"])
    rng = _rng_file(ckpt)
    if state["layout"] == _layout() and rng.is_file():
        _set_rng_state(load_plain_state(rng))
    elif dist.get_rank() == 0:
        log.warning(
            "resuming %s at layout %s (saved at %s): RNG streams (dropout) start afresh",
            ckpt.name, _layout(), state["layout"],
        )  # fmt: skip
    return Progress(
        state["step"], state["consumed_samples"], state["consumed_tokens"],
        state.get("source_samples", {}),
    )  # fmt: skip
