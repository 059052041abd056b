"""Where a DeepSpeed run's student comes from, and the transformers model built from it.

    start = resolve_start(cfg.train.deepspeed.model, cfg.model)   # cheap: configs only
    model = build_student(start, seed=cfg.train.seed)              # collective for model dirs

The source is a Hugging Face Llama directory, a fixture name (:mod:`kdscale.hub`),
a kdscale model directory (``import-hf``, ``prune``, a megatron run; converted with
:mod:`kdscale.models.hf_convert`), or nothing (a random Llama of the ``model`` section, seeded).
The architecture is the source's; ``model.precision`` and ``model.attention_dropout`` stay the
run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdscale.config import ModelConfig
from kdscale.errors import KDScaleError
from kdscale.hub import FIXTURES, resolve_model_dir
from kdscale.io import read_json
from kdscale.models.checkpoints import HF_META, open_model_dir, read_train_state
from kdscale.models.imported import is_hf_source
from kdscale.models.hf_convert import hf_config_to_model, model_to_hf_config

# ModelConfig fields the run keeps when the architecture comes from elsewhere.
_RUN_FIELDS = ("precision", "attention_dropout")


@dataclass(frozen=True)
class Start:
    """The student's source: ``kind`` and ``path`` (None for random), its ``model`` config and
    the directory holding its tokenizer files (None when unknown)."""

    kind: Literal["hf", "kdscale", "random"]
    path: Path | None
    model: ModelConfig
    tokenizer: Path | None


def resolve_start(source: str | None, run_model: ModelConfig) -> Start:
    """Identify ``train.deepspeed.model`` and read its architecture (no weights are read)."""
    if source is None:
        return Start("random", None, run_model, None)
    path = Path(source).expanduser()
    if is_hf_source(source):
        hf_dir = resolve_model_dir(source)
        hf = hf_config_to_model(read_json(hf_dir / "config.json", "HF config"))
        tokenizer = hf_dir if _has_tokenizer(hf_dir) else None
        return Start("hf", hf_dir, _with_run_fields(hf, run_model), tokenizer)
    if not path.is_dir():
        raise KDScaleError(
            f"train.deepspeed.model={source!r}: not a directory nor a fixture name "
            f"({', '.join(sorted(FIXTURES))})"
        )
    ckpt, model = open_model_dir(path, "train.deepspeed.model")
    if read_train_state(ckpt).get("engine", "megatron") != "megatron":
        raise KDScaleError(
            f"train.deepspeed.model={source!r} is a DeepSpeed run; start from its exported "
            f"Hugging Face directory ({path}/hf) instead"
        )
    meta = ckpt / HF_META
    tokenizer = meta if meta.is_dir() else None
    return Start("kdscale", ckpt, _with_run_fields(model, run_model), tokenizer)


def _has_tokenizer(hf_dir: Path) -> bool:
    return any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _with_run_fields(model: ModelConfig, run_model: ModelConfig) -> ModelConfig:
    return model.model_copy(update={f: getattr(run_model, f) for f in _RUN_FIELDS})


def hf_config(model: ModelConfig) -> LlamaConfig:
    """The transformers config of ``model`` (fp32 weights; the engine casts for bf16)."""
    config = LlamaConfig(**model_to_hf_config(model.model_copy(update={"precision": "fp32"})))
    config.attention_dropout = model.attention_dropout
    return config


def build_student(
    start: Start, seed: int, load_weights: bool = True, verify: bool = True
) -> LlamaForCausalLM:
    """The fp32 transformers student of ``start``; ``load_weights=False`` gives the architecture
    only (a resumed run loads its checkpoint over it). Collective for kdscale model dirs, whose
    checksums are verified first (``verify=False``: the explicit opt-out). HF weights are read
    from safetensors only (never a pickled ``.bin``)."""
    torch.manual_seed(seed)  # the random init (and anything not in the loaded weights)
    if start.kind == "hf" and load_weights:
        model = LlamaForCausalLM.from_pretrained(
            start.path, dtype=torch.float32, use_safetensors=True
        )
        model.config.attention_dropout = start.model.attention_dropout
        return model
    model = LlamaForCausalLM(hf_config(start.model))
    if start.kind == "kdscale" and load_weights:
        _load_model_dir(model, start, verify)
    elif start.kind == "random" and start.model.scaled_output_init:
        _scale_output_projections(model, start.model)
    return model


def _scale_output_projections(model: LlamaForCausalLM, config: ModelConfig) -> None:
    """Re-draw the attention output and MLP down projections at megatron's scaled std,
    ``init_method_std / sqrt(2 · num_layers)`` (``model.scaled_output_init``)."""
    std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.normal_(0.0, std)
            layer.mlp.down_proj.weight.normal_(0.0, std)


def _load_model_dir(model: LlamaForCausalLM, start: Start, verify: bool) -> None:
    """Load a kdscale (megatron) model directory's weights, converted to HF names."""
    from kdscale.models.hf_io import hf_state_of

    state = hf_state_of(start.path, start.model, verify)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if start.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise KDScaleError(
            f"train.deepspeed.model={start.path}: weights do not fit a LlamaForCausalLM "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()

