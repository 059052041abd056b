"""Model directories: weights-only checkpoints in the format `kdscale train` writes and loads.

`kdscale import-hf` and `kdscale prune` write a step-0 checkpoint (see
``kdscale/train/checkpoint.py``), so ``train.init=DIR`` starts a run from it and ``kdscale eval``
and ``export-hf`` read it like any training checkpoint::

    MODEL/
      <dist_checkpointing shards>   model weights (any TP/PP layout loads them)
      model.yaml                    the model section the weights fit
      config.yaml                   the resolved config (its model section = model.yaml)
      train_state.json              step 0, no optimizer state, and where the weights came from
      hf/                           tokenizer files + the HF token ids, for `export-hf`

Saving is collective over every rank and atomic: the directory appears under its final name
only once all ranks have written their shards.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing

from kdscale.config import KDScaleConfig, ModelConfig, write_resolved_config
from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_bytes, atomic_write_text, fsync_dir
from kdscale.train.checkpoint import MODEL_CONFIG, STATE
from kdscale.train.checkpoint import load_weights as _load_chunks
from kdscale.train.checkpoint import read_model_config, resolve_checkpoint

HF_META = "hf"


def open_model_dir(path: str | Path, what: str) -> tuple[Path, ModelConfig]:
    """The checkpoint directory ``path`` names (a model dir, run dir or step dir) and its model."""
    ckpt = resolve_checkpoint(path, what)
    return ckpt, read_model_config(ckpt)


def load_weights(gpt: torch.nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's weights into this rank's GPTModel (any TP layout; collective)."""
    _load_chunks(ckpt, [gpt])


def save_model_dir(
    out: str | Path,
    cfg: KDScaleConfig,
    gpt: torch.nn.Module,
    origin: dict,
    hf_meta: Path | None = None,
    overwrite: bool = False,
    extras: dict[str, bytes] | None = None,
) -> Path:
    """Write ``gpt`` (this rank's shard of a ``cfg.model`` model) as the model directory ``out``.

    ``origin``: recorded in ``train_state.json`` (what made the weights). ``hf_meta``: a
    directory copied to ``hf/``. ``extras``: more files (name → bytes), given on rank 0.
    Collective: every rank calls it.
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
    # The same structure as a training checkpoint's weights (one model chunk).
    dist_checkpointing.save({"model0": gpt.sharded_state_dict()}, str(tmp))
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
