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
        checksums.json                       size + sha256 of every other file, written last

``kdscale import-hf`` and ``kdscale prune`` write model directories (a step-0 checkpoint, see
:func:`save_model_dir`), so ``train.init=DIR``, ``kdscale eval`` and ``export-hf`` read them like
any training checkpoint. What training adds (optimizer, RNG streams, the schedule) is
:mod:`kdscale.train.checkpoint`'s.

Integrity: every save records ``checksums.json`` (:mod:`kdscale.integrity`; the ranks split the
hashing) and every load verifies it first (:func:`verify_checkpoint`, split over the ranks too),
so a truncated, flipped, missing or added file is refused in one line naming it. The small
metadata files are checked against it whenever they are read. ``checkpoints/latest`` must name a
step directory of its own run. A checkpoint from an untrusted source is code, checksums or not:
torch's dist_checkpointing metadata (``.metadata``, ``common.pt``) and DeepSpeed's files are
pickles that run on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel
from pydantic import ValidationError

from kdscale.config import KDScaleConfig, ModelConfig, write_resolved_config
from kdscale.config.loader import format_validation_error
from kdscale.config.model import architecture_fields
from kdscale.errors import KDScaleError
from kdscale.hub import FIXTURES, HF_META
from kdscale.integrity import CHECKSUMS, digest_files, list_files, verify_checksums, write_checksums
from kdscale.io import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    read_json,
    read_text,
    read_yaml,
    removed_on_failure,
    temp_directory,
)
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


_STEP_NAME = re.compile(r"step_\d{9,}")


def complete_steps(root: Path) -> list[Path]:
    """The complete step directories under a ``checkpoints/`` directory, oldest first (links to
    directories elsewhere are not steps of this run)."""
    return sorted(
        p for p in root.glob("step_*")
        if _STEP_NAME.fullmatch(p.name) and not p.is_symlink() and (p / STATE).is_file()
    )  # fmt: skip


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint ``<out>/checkpoints/latest`` names (or, if that pointer is missing or
    dangling, the newest complete one); None when there is none. A pointer that names anything
    but a step directory of this run (a path, ``..``, a link) is refused."""
    root = Path(out) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        name = read_text(pointer, "checkpoint pointer").strip()
        target = root / name
        if not _STEP_NAME.fullmatch(name) or target.is_symlink():
            raise KDScaleError(
                f"{pointer} names {name[:80]!r}, which is not a step directory of this run "
                f"(step_NNNNNNNNN under {root}); refusing to follow it: fix or delete the file"
            )
        if (target / STATE).is_file():
            return target
        log.warning("%s names %s, which is not a complete checkpoint", pointer, target.name)
    steps = complete_steps(root) if root.is_dir() else []
    return steps[-1] if steps else None


def _checked_metadata(ckpt: Path, name: str) -> Path:
    """``ckpt/name``, refused if ``checksums.json`` records other bytes for it (a small file:
    checked on every read, before its contents are trusted)."""
    path, sums = ckpt / name, ckpt / CHECKSUMS
    if sums.is_file() and path.is_file():
        body = read_json(sums, "checksum file")
        files = body.get("files") if isinstance(body, dict) else None
        recorded = files.get(name) if isinstance(files, dict) else None
        if recorded is not None and digest_files(ckpt, [name])[name] != recorded:
            raise KDScaleError(
                f"{path} is damaged: it differs from what {CHECKSUMS} recorded at save"
            )
    return path


def read_train_state(ckpt: Path) -> dict[str, Any]:
    """The ``train_state.json`` of a checkpoint."""
    state = read_json(_checked_metadata(ckpt, STATE), "checkpoint state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise KDScaleError(f"{ckpt / STATE} is damaged: no integer 'step'")
    return state


def _read_section(path: Path, section: type, what: str) -> Any:
    try:
        return section.model_validate(read_yaml(path, what))
    except ValidationError as exc:
        raise KDScaleError(f"{path} is damaged: {format_validation_error(exc)}") from None


def read_model_config(ckpt: Path) -> ModelConfig:
    """The model config a checkpoint was built from."""
    return _read_section(_checked_metadata(ckpt, MODEL_CONFIG), ModelConfig, "model config")


def read_run_config(ckpt: Path) -> KDScaleConfig:
    """The full resolved config of the run that wrote a checkpoint."""
    return _read_section(_checked_metadata(ckpt, "config.yaml"), KDScaleConfig, "run config")


def _share() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _merged(part: Any) -> list[Any]:
    """Every rank's ``part``, in rank order (just ``[part]`` without a process group)."""
    count = _share()[1]
    if count == 1:
        return [part]
    parts: list[Any] = [None] * count
    dist.all_gather_object(parts, part)
    return parts


def verify_checkpoint(ckpt: Path, verify: bool = True) -> None:
    """Refuse ``ckpt`` unless every file matches its ``checksums.json`` (collective when a
    process group exists: the ranks split the hashing and all raise the same one line).
    ``verify=False`` (``integrity.verify_checksums=false`` / ``--skip-checksums``) skips it."""
    if not verify:
        log.warning("loading %s without verifying its checksums", ckpt)
        return
    problems = sorted({p for part in _merged(verify_checksums(ckpt, _share())) for p in part})
    if not problems:
        return
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    hint = "restore it from a copy"
    if problems[0].startswith(f"{ckpt / CHECKSUMS} is missing"):
        hint = ("for a checkpoint saved before kdscale recorded checksums, load it once with "
                "integrity.verify_checksums=false (or --skip-checksums) and save it again")
    raise KDScaleError(f"checkpoint {ckpt} is damaged: {problems[0]}{more}; {hint}")


def checkpoint_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Digests of every file all ranks have written to ``directory`` so far, each rank hashing
    its share (collective; call after a barrier); the result is the same on every rank."""
    names, _ = list_files(directory)
    index, count = _share()
    merged: dict[str, dict[str, Any]] = {}
    for part in _merged(digest_files(directory, names[index::count])):
        merged |= part
    return merged


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


def load_weights(ckpt: Path, chunks: list[GPTModel], verify: bool = True) -> None:
    """Load only the model weights of ``ckpt`` into this rank's chunks (any layout; collective),
    after verifying its checksums (``verify=False``: the explicit opt-out)."""
    verify_checkpoint(ckpt, verify)
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
    Collective: every rank calls it. The directory is built under a temporary name of its own
    (two writers never share one) and appears under its final name, with ``checksums.json``,
    only once all ranks have written their shards.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KDScaleError(f"{out} exists; pass --overwrite to replace it")
    rank0 = dist.get_rank() == 0
    name = [str(temp_directory(out)) if rank0 else None]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    with removed_on_failure(tmp):
        dist_checkpointing.save(model_sharded_state([gpt]), str(tmp))
        dist.barrier()
        digests = checkpoint_digests(tmp)
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
            for extra, data in (extras or {}).items():
                atomic_write_bytes(tmp / extra, data)
            write_checksums(tmp, digests)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            fsync_dir(out.parent)
    dist.barrier()
    return out
