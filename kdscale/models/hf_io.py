"""``kdscale import-hf`` and ``kdscale export-hf``: HF Llama directories ↔ kdscale model dirs.

    kdscale import-hf ~/models/SmolLM2-135M runs/smollm2   # → a step-0 checkpoint (checkpoints.py)
    kdscale import-hf smollm2-135m runs/smollm2            # a fixture name works everywhere a model does
    kdscale export-hf runs/pruned runs/pruned-hf            # → config.json, model.safetensors,
    kdscale export-hf runs/student runs/student-hf --tokenizer ~/models/SmolLM2-135M  # trained

    kdscale import-hf ~/models/Llama-3.1-70B runs/llama70b --tensor-parallel 8   # at a teacher's layout

Import streams tensors from safetensors one at a time into the model (peak memory ≈ the model
plus one tensor, not the HF state dict and the model); by default in one process (TP=1), with
``--tensor-parallel``/``--pipeline-parallel`` in that many spawned ranks, each holding only its
shard. The written checkpoint loads at any layout (dist_checkpointing reshards); writing it at
the teacher's layout saves the reshard. Export runs in one process (fp32). Exported
directories load with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from safetensors.torch import save_file

from kdscale.config import KDScaleConfig, ModelConfig, ParallelConfig
from kdscale.errors import ArgumentParser, KDScaleError
from kdscale.hub import resolve_model_dir, resolve_tokenizer_dir
from kdscale.integrity import write_checksums
from kdscale.io import atomic_directory, atomic_write_text, read_json
from kdscale.logging import get_logger
from kdscale.models import build_gpt_model
from kdscale.models.gpt import validate_layout
from kdscale.models.hf_convert import (
    hf_config_to_model,
    hf_names,
    megatron_tensor,
    megatron_to_hf,
    model_to_hf_config,
)
from kdscale.models.parallel import parallel_session
from kdscale.models.checkpoints import HF_META, load_weights, open_model_dir, save_model_dir
from kdscale.models.tp_state import gather_full_state, load_tensors

log = get_logger(__name__)

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

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


# safetensors dtype names → torch dtypes (what HF Llama checkpoints hold).
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@contextlib.contextmanager
def hf_tensors(hf_dir: str | Path) -> Iterator[tuple[dict, dict[str, Callable[[], torch.Tensor]]]]:
    """An HF directory's ``config.json`` and, for every tensor of its safetensors weights (single
    file or sharded), a function that reads that one tensor (as float32) when called.

    Nothing is loaded until asked for, and a tensor is read with plain reads into memory of its
    own rather than through a memory map, whose pages would stay resident beside the model.
    """
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
    with contextlib.ExitStack() as stack:
        readers: dict[str, Callable[[], torch.Tensor]] = {}
        for file in files:
            handle = stack.enter_context(open(file, "rb"))
            for key, (dtype, shape, start, end) in _safetensors_header(handle, file).items():
                readers[key] = functools.partial(_read_tensor, handle, file, dtype, shape, start, end)
        yield config, readers


def _safetensors_header(handle: Any, file: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """``name → (dtype, shape, first byte, end byte)`` of a safetensors file (offsets absolute)."""
    try:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        entries = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{key}: dtype {entry['dtype']} is not a float type")
            begin, end = entry["data_offsets"]
            entries[key] = (_SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], 8 + size + begin, 8 + size + end)
        return entries
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise KDScaleError(f"{file}: not a readable safetensors file ({exc})") from None


def _read_tensor(handle: Any, file: Path, dtype: torch.dtype, shape: list[int], start: int, end: int) -> torch.Tensor:
    data = bytearray(end - start)
    if os.preadv(handle.fileno(), [data], start) != len(data):
        raise KDScaleError(f"{file}: not a readable safetensors file (truncated)")
    tensor = torch.frombuffer(data, dtype=dtype).reshape(shape) if data else torch.empty(shape, dtype=dtype)
    return tensor.float()


def read_hf_dir(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An HF directory's ``config.json`` and all its safetensors weights (float32)."""
    with hf_tensors(hf_dir) as (config, readers):
        return config, {key: read() for key, read in readers.items()}


def _write_meta(hf_dir: Path, config: dict, out: Path) -> None:
    out.mkdir(parents=True)
    for name in _META_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    tokens = {k: config[k] for k in _TOKEN_KEYS if k in config}
    atomic_write_text(out / "token_ids.json", json.dumps(tokens, indent=2) + "\n")


def import_hf(
    hf_dir: str | Path, out: str | Path, overwrite: bool = False, tensor: int = 1, pipeline: int = 1
) -> ModelConfig:
    """Convert an HF Llama directory into a kdscale model directory; returns its ModelConfig.

    Tensors stream from safetensors one at a time into this rank's model (never the whole HF
    state next to the model). ``tensor × pipeline`` > 1 writes the checkpoint at that layout
    (the one a teacher group loads without resharding) from that many spawned ranks, each
    reading only the tensors of its stage and keeping its slice.
    """
    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    with hf_tensors(hf_dir) as (hf_config, _):
        model = hf_config_to_model(hf_config)
    validate_layout(model, parallel, tensor * pipeline)
    if Path(out).exists() and not overwrite:
        raise KDScaleError(f"{out} exists; pass --overwrite to replace it")
    if tensor * pipeline == 1:
        _import_rank(hf_dir, out, overwrite, parallel)
    else:
        _spawn_ranks(_import_rank, tensor * pipeline, hf_dir, out, overwrite, parallel)
    log.info(
        "imported %s → %s (%d layers, hidden %d, tensor %d x pipeline %d)",
        hf_dir, out, model.num_layers, model.hidden_size, tensor, pipeline,
    )  # fmt: skip
    return model


def _import_rank(hf_dir: str | Path, out: str | Path, overwrite: bool, parallel: ParallelConfig) -> None:
    """This rank's part of :func:`import_hf` (collective)."""
    with hf_tensors(hf_dir) as (hf_config, readers), tempfile.TemporaryDirectory(
        prefix="kdscale-import-"
    ) as tmp, parallel_session(parallel):
        model = hf_config_to_model(hf_config)
        expected = set(hf_names(model)) | ({"lm_head.weight"} if model.tie_embeddings else set())
        extra = sorted(k for k in readers if k not in expected and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise KDScaleError(f"HF state dict has tensors a Llama model does not: {extra[:5]}")
        meta = Path(tmp) / HF_META
        _write_meta(Path(hf_dir), hf_config, meta)
        gpt = build_gpt_model(
            model, parallel, pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )  # fmt: skip
        first = gpt.decoder.layers[0].layer_number - 1 if len(gpt.decoder.layers) else 0

        def read(key: str) -> torch.Tensor:
            if key not in readers:
                raise KDScaleError(f"HF state dict has no {key!r}; is it a Llama checkpoint?")
            return readers[key]()

        def full_tensor(name: str) -> torch.Tensor:  # local layer numbers → the model's
            name = _LOCAL_LAYER.sub(lambda m: f"decoder.layers.{int(m[1]) + first}.", name)
            return megatron_tensor(name, read, model)

        load_tensors(gpt, full_tensor)
        origin = {"command": "import-hf", "source": str(Path(hf_dir).resolve()),
                  "layout": {"tensor": parallel.tensor, "pipeline": parallel.pipeline}}  # fmt: skip
        save_model_dir(out, KDScaleConfig(model=model), gpt, origin, meta, overwrite=overwrite)


def _spawn_ranks(fn: Callable[..., None], ranks: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``ranks`` spawned processes that form one process group on this
    machine; a rank's KDScaleError comes back as one line."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        mp.start_processes(_spawned, args=(ranks, port, fn, args), nprocs=ranks, start_method="spawn")
    except mp.ProcessRaisedException as exc:
        found = [line for line in str(exc).splitlines() if "KDScaleError: " in line]
        if found:
            raise KDScaleError(found[-1].split("KDScaleError: ", 1)[1]) from None
        raise


def _spawned(rank: int, ranks: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank))  # fmt: skip
    fn(*args)


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
    """``kdscale import-hf HF_DIR OUT [--tensor-parallel N] [--pipeline-parallel N]``."""
    parser = _parser(
        "import-hf",
        "HF_DIR",
        "OUT",
        "Convert an HF Llama directory or a fixture name (smollm2-135m) to a kdscale "
        "model directory (megatron dist checkpoint + model config).",
    )
    for what in ("tensor", "pipeline"):
        parser.add_argument(
            f"--{what}-parallel", type=int, default=1, metavar="N",
            help=f"write the checkpoint at {what}-parallel size N (N spawned ranks; the layout "
            "a teacher group of cache.teacher.tensor_parallel x pipeline_parallel loads as is)",
        )  # fmt: skip
    args = parser.parse_args(argv)
    import_hf(resolve_model_dir(args.src), args.out, overwrite=args.overwrite,
              tensor=args.tensor_parallel, pipeline=args.pipeline_parallel)  # fmt: skip
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
