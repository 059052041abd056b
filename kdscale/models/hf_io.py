"""``kdscale import-hf`` and ``kdscale export-hf``: HF Llama directories ↔ kdscale model dirs.

    kdscale import-hf ~/models/SmolLM2-135M runs/smollm2   # → a step-0 checkpoint (checkpoints.py)
    kdscale import-hf smollm2-135m runs/smollm2            # a fixture name works everywhere a model does
    kdscale export-hf runs/pruned runs/pruned-hf            # → config.json, model.safetensors,
    kdscale export-hf runs/student runs/student-hf --tokenizer ~/models/SmolLM2-135M  # trained

Both run in one process (TP=1, fp32); the written checkpoint loads at any TP layout. Exported
directories load with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdscale.config import KDScaleConfig, ModelConfig, ParallelConfig
from kdscale.errors import ArgumentParser, KDScaleError
from kdscale.hub import resolve_model_dir, resolve_tokenizer_dir
from kdscale.integrity import write_checksums
from kdscale.io import atomic_directory, atomic_write_text, read_json
from kdscale.logging import get_logger
from kdscale.models import build_gpt_model
from kdscale.models.hf_convert import (
    hf_config_to_model,
    hf_to_megatron,
    megatron_to_hf,
    model_to_hf_config,
)
from kdscale.models.parallel import parallel_session
from kdscale.models.checkpoints import HF_META, load_weights, open_model_dir, save_model_dir
from kdscale.models.tp_state import gather_full_state, load_full_state

log = get_logger(__name__)

# Everything of an HF directory besides the weights and the architecture: the tokenizer and
# generation defaults. Copied through import → prune → export unchanged.
_META_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# HF config keys that are not architecture: kept from the imported config for export.
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def read_hf_dir(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An HF directory's ``config.json`` and its safetensors weights (single file or sharded)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise KDScaleError(f"{hf_dir}: no config.json; expected a Hugging Face model directory")
    config = read_json(hf_dir / "config.json", "HF config")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise KDScaleError(
            f"{hf_dir}: no *.safetensors weights (found: {', '.join(p.name for p in hf_dir.iterdir())});"
            " re-save with save_pretrained(safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise KDScaleError(f"{file}: not a readable safetensors file ({exc})") from None
    return config, {k: t.float() for k, t in state.items()}


def _write_meta(hf_dir: Path, config: dict, out: Path) -> None:
    out.mkdir(parents=True)
    for name in _META_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    tokens = {k: config[k] for k in _TOKEN_KEYS if k in config}
    atomic_write_text(out / "token_ids.json", json.dumps(tokens, indent=2) + "\n")


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False) -> ModelConfig:
    """Convert an HF Llama directory into a kdscale model directory; returns its ModelConfig."""
    hf_config, hf_state = read_hf_dir(hf_dir)
    model = hf_config_to_model(hf_config)
    full = hf_to_megatron(hf_state, model)
    with tempfile.TemporaryDirectory(prefix="kdscale-import-") as tmp, parallel_session(
        ParallelConfig()
    ):
        meta = Path(tmp) / HF_META
        _write_meta(Path(hf_dir), hf_config, meta)
        gpt = build_gpt_model(model, ParallelConfig(), pre_process=True, post_process=True)
        load_full_state(gpt, full)
        origin = {"command": "import-hf", "source": str(Path(hf_dir).resolve())}
        save_model_dir(out, KDScaleConfig(model=model), gpt, origin, meta, overwrite=overwrite)
    log.info(
        "imported %s → %s (%d layers, hidden %d)", hf_dir, out, model.num_layers, model.hidden_size
    )
    return model


def hf_state_of(ckpt: Path, model: ModelConfig, verify: bool = True) -> dict[str, torch.Tensor]:
    """A kdscale checkpoint's full weights under transformers' Llama names (one rank, inside a
    parallel session), its checksums verified first unless ``verify`` is False."""
    gpt = build_gpt_model(model, ParallelConfig(), pre_process=True, post_process=True)
    load_weights(ckpt, [gpt], verify)
    return megatron_to_hf(gather_full_state(gpt), model)


def export_hf(
    ckpt: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a kdscale checkpoint (model dir, run dir or step dir) as an HF Llama directory.

    Tokenizer and generation files come from ``tokenizer`` (an HF directory, a fixture name or
    a kdscale model directory) if given, else from the checkpoint's ``hf/`` (model directories
    have one; training checkpoints do not). The checkpoint's checksums are verified first
    (``verify=False``: the explicit opt-out); the export records its own ``checksums.json``.
    """
    ckpt, model = open_model_dir(ckpt, "MODEL_DIR")
    out = Path(out)
    meta = resolve_tokenizer_dir(str(tokenizer)) if tokenizer is not None else ckpt / HF_META
    token_ids = meta / "token_ids.json"
    if token_ids.is_file():
        tokens = read_json(token_ids, "token ids file")
    elif (meta / "config.json").is_file():
        tokens = {
            k: v
            for k, v in read_json(meta / "config.json", "HF config").items()
            if k in _TOKEN_KEYS
        }
    else:
        tokens = {}
    config = model_to_hf_config(model, extra=tokens)  # refuses an unexportable shape up front
    if out.exists() and not overwrite:
        raise KDScaleError(f"{out} exists; pass --overwrite to replace it")
    if not meta.is_dir():
        log.warning(
            "%s has no %s/: exporting without tokenizer files (pass --tokenizer HF_DIR)",
            ckpt,
            HF_META,
        )
    with parallel_session(ParallelConfig()):
        hf_state = hf_state_of(ckpt, model, verify)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if meta.is_dir():
            for file in meta.iterdir():
                if file.name in _META_FILES:
                    shutil.copy2(file, tmp / file.name)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        save_file(
            {k: t.contiguous() for k, t in hf_state.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        write_checksums(tmp)
    log.info("exported %s → %s", ckpt, out)
    return out


def _parser(prog: str, src: str, dst: str, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"kdscale {prog}", description=description)
    parser.add_argument("src", metavar=src)
    parser.add_argument("out", metavar=dst)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def import_main(argv: list[str]) -> int:
    """``kdscale import-hf HF_DIR OUT``."""
    args = _parser(
        "import-hf",
        "HF_DIR",
        "OUT",
        "Convert an HF Llama directory or a fixture name (smollm2-135m) to a kdscale "
        "model directory (megatron dist checkpoint + model config).",
    ).parse_args(argv)
    import_hf(resolve_model_dir(args.src), args.out, overwrite=args.overwrite)
    return 0


def export_main(argv: list[str]) -> int:
    """``kdscale export-hf MODEL_DIR OUT``."""
    parser = _parser(
        "export-hf",
        "MODEL_DIR",
        "OUT",
        "Write a kdscale model directory or training "
        "checkpoint as an HF Llama directory (config.json, model.safetensors, tokenizer).",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="HF_DIR",
        help="copy tokenizer files from this HF directory, fixture name or kdscale model "
        "directory (default: MODEL_DIR/hf)",
    )
    parser.add_argument(
        "--skip-checksums",
        action="store_true",
        help="load MODEL_DIR without verifying its checksums.json (only for a checkpoint you "
        "have verified yourself)",
    )
    args = parser.parse_args(argv)
    export_hf(args.src, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
              verify=not args.skip_checksums)  # fmt: skip
    return 0
