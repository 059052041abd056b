"""Hugging Face models where a kdscale checkpoint is expected, imported once into the cache.

    ckpt = imported_model_dir("smollm2-135m")   # <cache>/imported/smollm2-135m-<digest>/

``train.init``, ``prune.model``, ``cache.teacher.model`` (megatron backend), ``kdscale eval`` and
``export-hf`` read kdscale model directories; given a fixture name or a Hugging Face directory
instead (:func:`is_hf_source`), :func:`kdscale.models.checkpoints.resolve_checkpoint` hands it
here. The import is ``kdscale import-hf`` run in a child process (a world of one, whatever
process group the caller is in), under a file lock, into ``$KDSCALE_CACHE_DIR/imported/``; the
directory is keyed by the source's path, ``config.json`` and weight files (name, size, mtime),
so an edited source is imported again and every later call returns at once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from kdscale.errors import KDScaleError
from kdscale.hub import FIXTURES, cache_root, file_lock, resolve_model_dir
from kdscale.logging import get_logger

log = get_logger(__name__)

# A child process must not join the caller's job (torchrun's or a test's process group).
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip
_COMPLETE = "train_state.json"  # model directories appear atomically with it


def is_hf_source(name_or_dir: str) -> bool:
    """Whether ``name_or_dir`` names a fixture or a Hugging Face model directory."""
    return name_or_dir in FIXTURES or (Path(name_or_dir).expanduser() / "config.json").is_file()


def _source_key(hf_dir: Path) -> str:
    digest = hashlib.sha256(str(hf_dir.resolve()).encode())
    digest.update((hf_dir / "config.json").read_bytes())
    for weights in sorted(hf_dir.glob("*.safetensors")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def imported_model_dir(name_or_dir: str) -> Path:
    """The kdscale model directory of a fixture or Hugging Face directory (imported once)."""
    hf_dir = resolve_model_dir(name_or_dir)
    root = cache_root() / "imported"
    out = root / f"{hf_dir.name}-{_source_key(hf_dir)}"
    if (out / _COMPLETE).is_file():
        return out
    with file_lock(root / f".{out.name}.lock"):
        if (out / _COMPLETE).is_file():  # another process imported it while we waited
            return out
        log.info("importing %s into %s (once)", name_or_dir, out)
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
        command = [sys.executable, "-m", "kdscale.cli", "import-hf", str(hf_dir), str(out)]
        done = subprocess.run(
            [*command, "--overwrite"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise KDScaleError(f"importing {name_or_dir!r} failed: {last}")
    return out
