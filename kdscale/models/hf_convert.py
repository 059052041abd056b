"""Hugging Face Llama ↔ megatron-core GPT: configs and full (unsharded, TP=1) state dicts.

Pure tensor bookkeeping, no megatron import. The megatron names are those of the local layer
spec (``get_gpt_layer_local_spec``), which kdscale uses for checkpoints at every layout:

=====================================================  ==========================================
megatron (``decoder.layers.{i}.`` prefix inside)        Hugging Face (``model.layers.{i}.``)
=====================================================  ==========================================
``embedding.word_embeddings.weight``                    ``model.embed_tokens.weight``
``input_layernorm.weight``                              ``input_layernorm.weight``
``self_attention.linear_qkv.weight``                    ``self_attn.{q,k,v}_proj.weight`` (fused)
``self_attention.linear_proj.weight``                   ``self_attn.o_proj.weight``
``pre_mlp_layernorm.weight``                            ``post_attention_layernorm.weight``
``mlp.linear_fc1.weight``                               ``mlp.{gate,up}_proj.weight`` ([gate; up])
``mlp.linear_fc2.weight``                               ``mlp.down_proj.weight``
``decoder.final_layernorm.weight``                      ``model.norm.weight``
``output_layer.weight`` (untied only)                   ``lm_head.weight``
=====================================================  ==========================================

The fused QKV rows are grouped per key/value head g: the query rows of g's heads, then k_g,
then v_g (megatron splits ``[ng, (np/ng + 2)·hn]``). RoPE needs no permutation: both sides
rotate halves (megatron's ``rotary_interleaved=False``, HF ``rotate_half``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from kdscale.config import ModelConfig
from kdscale.errors import KDScaleError

_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
_LAYER = "decoder.layers.{i}."


def _rope_theta(hf: dict[str, Any]) -> float:
    """RoPE θ from either config generation (``rope_parameters`` or ``rope_theta``)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        field = "rope_parameters.rope_type" if params else "rope_scaling.rope_type"
        raise KDScaleError(
            f"HF config {field}={kind!r} is not supported (only plain RoPE, 'default'); "
            "scaled RoPE variants would change the logits"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_config_to_model(hf: dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` for an HF Llama ``config.json``; refuses what megatron would compute
    differently, naming the field."""
    architectures = hf.get("architectures") or [hf.get("model_type")]
    if hf.get("model_type") != "llama" or list(architectures) != list(_SUPPORTED_ARCHITECTURES):
        raise KDScaleError(
            f"HF config architectures={architectures} model_type={hf.get('model_type')!r} is not "
            f"supported; kdscale imports {', '.join(_SUPPORTED_ARCHITECTURES)} (model_type 'llama')"
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise KDScaleError(f"HF config {field}=true is not supported (Llama without biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise KDScaleError(
            f"HF config hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
        )
    if hf.get("pretraining_tp", 1) != 1:
        raise KDScaleError(
            f"HF config pretraining_tp={hf['pretraining_tp']} is not supported (only 1)"
        )
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rotary_base=_rope_theta(hf),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def model_to_hf_config(model: ModelConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF ``LlamaConfig`` dict for ``model``; ``extra`` (token ids, …) is merged underneath.

    transformers' ``LlamaConfig`` refuses a hidden size that its head count does not divide, even
    with an explicit ``head_dim``; such a model (megatron runs it) cannot be exported.
    """
    if model.hidden_size % model.num_attention_heads:
        raise KDScaleError(
            f"model.hidden_size={model.hidden_size} is not divisible by "
            f"model.num_attention_heads={model.num_attention_heads}: transformers' LlamaConfig "
            "refuses that shape, so it cannot be exported (prune to a hidden size it divides)"
        )
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    return {
        **(extra or {}),
        "architectures": list(_SUPPORTED_ARCHITECTURES),
        "model_type": "llama",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": head_dim,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_method_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "dtype": "float32" if model.precision == "fp32" else "bfloat16",  # the stored weights
    }


def _take(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise KDScaleError(f"{source} state dict has no {key!r}; is it a Llama checkpoint?")
    return state.pop(key)


def _shape(model: ModelConfig) -> tuple[int, int, int]:
    """(query heads per group, key/value groups, head width)."""
    kv = model.kv_channels or model.hidden_size // model.num_attention_heads
    return model.num_attention_heads // model.num_query_groups, model.num_query_groups, kv


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """megatron's fused QKV weight from HF's q/k/v projections (rows grouped per KV head)."""
    per_group, groups, kv = _shape(model)
    hidden = q.shape[1]
    fused = torch.cat(
        [
            q.reshape(groups, per_group * kv, hidden),
            k.reshape(groups, kv, hidden),
            v.reshape(groups, kv, hidden),
        ],
        dim=1,
    )
    return fused.reshape(groups * (per_group + 2) * kv, hidden)


def split_qkv(fused: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, ...]:
    """HF's (q, k, v) projections from megatron's fused QKV weight; inverse of ``fuse_qkv``."""
    per_group, groups, kv = _shape(model)
    hidden = fused.shape[1]
    q, k, v = fused.reshape(groups, (per_group + 2) * kv, hidden).split(
        [per_group * kv, kv, kv], dim=1
    )
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


_HF_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LAYER_NAME = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def megatron_names(model: ModelConfig) -> list[str]:
    """Every tensor name of the full megatron GPTModel (local spec, one stage) for ``model``."""
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight",
                 "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
                 "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]  # fmt: skip
    names = ["embedding.word_embeddings.weight"]
    names += [_LAYER.format(i=i) + n for i in range(model.num_layers) for n in per_layer]
    names.append("decoder.final_layernorm.weight")
    return names + ([] if model.tie_embeddings else ["output_layer.weight"])


def hf_names(model: ModelConfig) -> list[str]:
    """Every tensor name of the HF Llama state dict :func:`hf_to_megatron` consumes."""
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 *(f"self_attn.{n}_proj.weight" for n in "qkvo"),
                 *(f"mlp.{n}_proj.weight" for n in ("gate", "up", "down"))]  # fmt: skip
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(model.num_layers) for n in per_layer]
    return names + ([] if model.tie_embeddings else ["lm_head.weight"])


def megatron_tensor(name: str, read: Callable[[str], torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """One full megatron tensor (global layer numbering) made from the HF tensors ``read``
    returns by name: what a streaming import converts one at a time. A tied model's
    ``output_layer.weight`` (the copy a last pipeline stage holds) is the embedding."""
    if name == "embedding.word_embeddings.weight" or (name == "output_layer.weight" and model.tie_embeddings):
        return read("model.embed_tokens.weight")
    if name == "decoder.final_layernorm.weight":
        return read("model.norm.weight")
    if name == "output_layer.weight":
        return read("lm_head.weight")
    match = _LAYER_NAME.fullmatch(name)
    if match is None:
        raise KDScaleError(f"megatron tensor {name!r} has no Hugging Face Llama counterpart")
    hf, rest = f"model.layers.{match[1]}.", match[2]
    if rest == "self_attention.linear_qkv.weight":
        return fuse_qkv(*(read(f"{hf}self_attn.{n}_proj.weight") for n in "qkv"), model)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([read(hf + "mlp.gate_proj.weight"), read(hf + "mlp.up_proj.weight")], dim=0)
    if rest not in _HF_LAYER_NAMES:
        raise KDScaleError(f"megatron tensor {name!r} has no Hugging Face Llama counterpart")
    return read(hf + _HF_LAYER_NAMES[rest])


def hf_to_megatron(
    hf_state: dict[str, torch.Tensor], model: ModelConfig
) -> dict[str, torch.Tensor]:
    """The full megatron GPTModel state dict (local spec, TP=1) for an HF Llama state dict."""
    src = dict(hf_state)
    if not model.tie_embeddings and "lm_head.weight" not in src:
        raise KDScaleError("HF state dict has no 'lm_head.weight' but tie_word_embeddings=false")
    out = {n: megatron_tensor(n, lambda key: _take(src, key, "HF"), model) for n in megatron_names(model)}
    src.pop("lm_head.weight", None)
    src = {k: t for k, t in src.items() if not k.endswith("rotary_emb.inv_freq")}
    if src:
        raise KDScaleError(f"HF state dict has tensors a Llama model does not: {sorted(src)[:5]}")
    return out


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """The HF Llama state dict for a full megatron GPTModel state dict (inverse of the above).

    A tied model has no ``lm_head.weight`` (transformers ties it to the embedding on load).
    """
    src = {k: t for k, t in state.items() if not k.endswith("._extra_state")}
    out = {"model.embed_tokens.weight": _take(src, "embedding.word_embeddings.weight", "megatron")}
    for i in range(model.num_layers):
        hf, mg = f"model.layers.{i}.", _LAYER.format(i=i)
        qkv = _take(src, mg + "self_attention.linear_qkv.weight", "megatron")
        for name, tensor in zip("qkv", split_qkv(qkv, model)):
            out[f"{hf}self_attn.{name}_proj.weight"] = tensor
        out[hf + "input_layernorm.weight"] = _take(src, mg + "input_layernorm.weight", "megatron")
        out[hf + "self_attn.o_proj.weight"] = _take(
            src, mg + "self_attention.linear_proj.weight", "megatron"
        )
        out[hf + "post_attention_layernorm.weight"] = _take(
            src, mg + "pre_mlp_layernorm.weight", "megatron"
        )
        gate, up = _take(src, mg + "mlp.linear_fc1.weight", "megatron").chunk(2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = up
        out[hf + "mlp.down_proj.weight"] = _take(src, mg + "mlp.linear_fc2.weight", "megatron")
    out["model.norm.weight"] = _take(src, "decoder.final_layernorm.weight", "megatron")
    head = src.pop("output_layer.weight", None)
    if not model.tie_embeddings:
        assert head is not None, "untied megatron model without output_layer.weight"
        out["lm_head.weight"] = head
    assert not src, f"megatron tensors left unconverted: {sorted(src)[:5]}"
    return out
