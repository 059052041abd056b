"""The on-disk format of kdscale checkpoints: finding one, reading what it holds, loading its weights,
and writing weights-only model directories.

Training runs and model directories share one layout::

    RUN/checkpoints/latest                   text file naming the newest complete checkpoint
    RUN/checkpoints/step_000000100/          one checkpoint (a model directory has the same files)
        <dist_checkpointing shards>          model weights (any TP/PP layout loads them), and
                                             optimizer state in training checkpoints
        model.yaml                           the model section the weights fit
        config.yaml                          the resolved config of the run that wrote it
        train_state.json                     step, consumed samples, schedule, layout, inputs
        hf/                                  model directories: tokenizer files + HF token ids

``kdscale import-hf`` and ``kdscale prune`` write model directories (a step-0 checkpoint, see
:func:`save_model_dir`), so ``train.init=DIR``, ``kdscale eval`` and ``export-hf`` read them like
any training checkpoint. What training adds (optimizer, RNG streams, the schedule) is
:mod:`kdscale.train.checkpoint`'s.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel

from kdscale.config import KDScaleConfig, ModelConfig, write_resolved_config
from kdscale.config.model import architecture_fields
from kdscale.errors import KDScaleError
from kdscale.hub import FIXTURES, HF_META
from kdscale.io import atomic_write_bytes, atomic_write_text, fsync_dir
from kdscale.logging import get_logger
from kdscale.models.imported import imported_model_dir, is_hf_source

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "train_state.json"
MODEL_CONFIG = "model.yaml"


def step_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:09d}"


def complete_steps(root: Path) -> list[Path]:
    """The complete step directories under a ``checkpoints/`` directory, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE).is_file())


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint ``<out>/checkpoints/latest`` names (or, if that pointer is missing or
    dangling, the newest complete one); None when there is none."""
    root = Path(out) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE).is_file():
            return target
        log.warning("%s names %s, which is not a complete checkpoint", pointer, target.name)
    steps = complete_steps(root) if root.is_dir() else []
    return steps[-1] if steps else None


def read_train_state(ckpt: Path) -> dict[str, Any]:
    """The ``train_state.json`` of a checkpoint."""
    return json.loads((ckpt / STATE).read_text())


def read_model_config(ckpt: Path) -> ModelConfig:
    """The model config a checkpoint was built from."""
    return ModelConfig.model_validate(yaml.safe_load((ckpt / MODEL_CONFIG).read_text()))


def read_run_config(ckpt: Path) -> KDScaleConfig:
    """The full resolved config of the run that wrote a checkpoint."""
    return KDScaleConfig.model_validate(yaml.safe_load((ckpt / "config.yaml").read_text()))


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A megatron step directory from a run directory, its ``checkpoints/``, a step directory or
    a model directory; a fixture name or a Hugging Face directory is imported once
    (:mod:`kdscale.models.imported`). A DeepSpeed run is refused: its weights load through
    transformers."""
    path = Path(path)
    found = path if (path / STATE).is_file() else latest_checkpoint(
        path.parent if path.name == CHECKPOINTS else path
    )
    if found is None and is_hf_source(str(path)):
        return imported_model_dir(str(path))
    if found is not None:
        engine = read_train_state(found).get("engine", "megatron")
        if engine != "megatron":
            raise KDScaleError(
                f"{what}={str(path)!r} was trained with train.engine={engine}: its weights are not "
                "a megatron checkpoint; use the Hugging Face directory the run exported "
                "(<train.out>/hf), or `kdscale import-hf` it"
            )
        return found
    raise KDScaleError(
        f"{what}={str(path)!r} is not a model: expected a kdscale run directory with "
        f"{CHECKPOINTS}/, a step or model directory holding {STATE}, a Hugging Face directory "
        f"(config.json) or a fixture name ({', '.join(sorted(FIXTURES))})"
    )


def open_model_dir(path: str | Path, what: str) -> tuple[Path, ModelConfig]:
    """The checkpoint directory ``path`` names (a model dir, run dir or step dir) and its model."""
    ckpt = resolve_checkpoint(path, what)
    return ckpt, read_model_config(ckpt)


def check_architecture(ckpt: Path, model: ModelConfig, what: str) -> None:
    """Refuse a checkpoint whose tensors do not fit ``model``, naming every differing field."""
    saved = read_model_config(ckpt)
    diffs = [
        f"model.{f}={getattr(model, f)!r} (checkpoint: {getattr(saved, f)!r})"
        for f in architecture_fields()
        if getattr(model, f) != getattr(saved, f)
    ]
    if diffs:
        raise KDScaleError(
            f"{what}: checkpoint {ckpt} was built for another model: {'; '.join(diffs)}"
        )


def model_sharded_state(chunks: list[GPTModel]) -> dict[str, Any]:
    """The weights of this rank's model chunks as dist_checkpointing sees them (``model<i>``)."""
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_weights(ckpt: Path, chunks: list[GPTModel]) -> None:
    """Load only the model weights of ``ckpt`` into this rank's chunks (any layout; collective)."""
    loaded = dist_checkpointing.load(model_sharded_state(chunks), str(ckpt))
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"])


def save_model_dir(
    out: str | Path,
    cfg: KDScaleConfig,
    gpt: GPTModel,
    origin: dict,
    hf_meta: Path | None = None,
    overwrite: bool = False,
    extras: dict[str, bytes] | None = None,
) -> Path:
    """Write ``gpt`` (this rank's shard of a ``cfg.model`` model) as the model directory ``out``.

    ``origin``: recorded in ``train_state.json`` (what made the weights). ``hf_meta``: a
    directory copied to ``hf/``. ``extras``: more files (name → bytes), given on rank 0.
    Collective: every rank calls it. The directory appears under its final name only once all
    ranks have written their shards.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KDScaleError(f"{out} exists; pass --overwrite to replace it")
    rank0 = dist.get_rank() == 0
    tmp = out.with_name(f".{out.name}.tmp")
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state([gpt]), str(tmp))
    dist.barrier()
    if rank0:
        atomic_write_text(tmp / MODEL_CONFIG, yaml.safe_dump(cfg.model.model_dump(mode="json")))
        write_resolved_config(cfg, tmp)
        state = {
            "step": 0,
            "consumed_samples": 0,
            "consumed_tokens": 0,
            "optimizer_state": False,
            "origin": origin,
        }
        atomic_write_text(tmp / STATE, json.dumps(state, indent=2) + "\n")
        if hf_meta is not None:
            shutil.copytree(hf_meta, tmp / HF_META)
        for name, data in (extras or {}).items():
            atomic_write_bytes(tmp / name, data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    dist.barrier()
    return out
