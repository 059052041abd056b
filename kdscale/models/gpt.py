"""Build the megatron-core GPT student (Llama family) from ``kdscale.config.ModelConfig``.

Llama family: RMSNorm, SwiGLU MLP (gated linear unit + SiLU), RoPE with ``rotary_base``,
grouped-query attention (``num_query_groups``), no biases, tied or untied embeddings. The
layer spec is megatron's local spec (plain torch, works on CPU) unless Transformer Engine is
chosen (``transformer_impl``) and usable; FP8 needs Transformer Engine on a CUDA GPU.

The vocabulary is used exactly as configured (never padded to a multiple of 128·TP as
megatron-LM does): the KD loss and the teacher cache index exact token ids.

Example (after ``kdscale.models.parallel.initialize_parallel``)::

    chunks = build_model_chunks(cfg.model, cfg.parallel)   # one GPTModel per virtual stage

Students and teachers are built with ``returns="hidden"`` (:class:`HiddenStateGPTModel`): the
last stage returns the final-norm hidden states, and the loss (or the teacher's scoring) applies
the vocab-parallel output layer itself, so the caller sees where the logits are made.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from kdscale.config import ModelConfig, ParallelConfig
from kdscale.errors import KDScaleError

# Parameter dtype per precision. fp8 keeps bf16 parameters: Transformer Engine runs the GEMMs
# in fp8 and everything else in bf16 (megatron-LM's --fp8-format goes with --bf16).
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


def validate_layout(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Raise KDScaleError naming every way ``model`` cannot be split as ``parallel`` says.

    Cheap and communication-free: call it before initializing anything.
    """
    tp, pp, vp = parallel.tensor, parallel.pipeline, parallel.virtual_pipeline
    problems = []
    if world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by parallel.tensor × parallel.pipeline "
            f"= {tp}×{pp} = {tp * pp}; launch a multiple of {tp * pp} ranks"
        )
    if model.num_attention_heads % tp:
        problems.append(
            f"model.num_attention_heads={model.num_attention_heads} is not divisible by "
            f"parallel.tensor={tp} (each tensor rank holds whole query heads)"
        )
    if model.num_query_groups % tp:
        problems.append(
            f"model.num_query_groups={model.num_query_groups} is not divisible by "
            f"parallel.tensor={tp} (each tensor rank holds whole key/value heads)"
        )
    if model.ffn_hidden_size % tp:
        problems.append(
            f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by "
            f"parallel.tensor={tp} (each tensor rank holds an equal slice of the MLP)"
        )
    if model.vocab_size % tp:
        problems.append(
            f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor={tp} "
            "(the vocabulary is split evenly over tensor ranks and never padded, because the "
            "KD loss and the teacher cache index exact token ids)"
        )
    if vp is not None and pp < 2:
        problems.append(f"parallel.virtual_pipeline={vp} needs parallel.pipeline >= 2, got {pp}")
    elif model.num_layers % (pp * (vp or 1)):
        split = f"parallel.pipeline={pp}" + (f" × parallel.virtual_pipeline={vp}" if vp else "")
        problems.append(f"model.num_layers={model.num_layers} is not divisible by {split}")
    if problems:
        raise KDScaleError("bad parallel layout: " + "; ".join(problems))


@functools.cache
def _transformer_engine_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or the RuntimeError of TE's empty meta package
        return False
    return True


def _use_transformer_engine(model: ModelConfig) -> bool:
    """Pick the layer implementation; fail with one line if the configured one cannot run."""
    if model.precision == "fp8" and model.transformer_impl == "local":
        raise KDScaleError(
            "model.precision='fp8' needs Transformer Engine, but model.transformer_impl='local'; "
            "use 'auto' or 'transformer_engine'"
        )
    if model.precision == "fp8" or model.transformer_impl == "transformer_engine":
        missing = []
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU")
        if not _transformer_engine_importable():
            missing.append("no importable transformer_engine (pip install 'kdscale[gpu]')")
        if missing:
            setting = (
                "model.precision='fp8'"
                if model.precision == "fp8"
                else "model.transformer_impl='transformer_engine'"
            )
            raise KDScaleError(
                f"{setting} needs Transformer Engine on a CUDA GPU; this machine has "
                + " and ".join(missing)
            )
        return True
    return (
        model.transformer_impl == "auto"
        and torch.cuda.is_available()
        and _transformer_engine_importable()
    )


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """megatron's TransformerConfig for a Llama-family ``model`` laid out as ``parallel``."""
    _use_transformer_engine(model)  # fail here, before any weights exist
    on_gpu = torch.cuda.is_available()
    dtype = _DTYPES[model.precision]
    fp8 = {}
    if model.precision == "fp8":
        fp8 = dict(
            fp8=model.fp8_format,
            fp8_recipe=model.fp8_recipe,
            fp8_margin=model.fp8_margin,
            fp8_amax_history_len=model.fp8_amax_history_len,
            fp8_amax_compute_algo=model.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=model.init_method_std,
        # megatron scales the output projections (attention dense, MLP fc2) by 1/sqrt(2·layers)
        # unless given their init; Hugging Face's Llama does not scale them.
        output_layer_init_method=None
        if model.scaled_output_init
        else init_method_normal(model.init_method_std),
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        # On CPU, weights are created on the CPU (there is no device to create them on). The
        # master weight is initialized whole and then split, so TP does not change the init.
        use_cpu_initialization=not on_gpu,
        # Pipeline p2p. Batched p2p posts the sends to both neighbours on one group; on gloo
        # with 2 stages (both neighbours are one rank) the interleaved schedule then pairs a
        # gradient send with an activation receive (wrong losses, no error). The unbatched
        # path puts the two directions on two groups, and has no torch.cuda.synchronize().
        # On GPU, interleaving takes the unbatched path as in megatron-LM's defaults
        # (batch_p2p_comm = not overlap_p2p_comm, overlap on only when interleaving).
        batch_p2p_comm=on_gpu and parallel.virtual_pipeline is None,
        # megatron 0.16's default ("full") is deprecated in favour of this, which means the same.
        cuda_graph_scope=[],
        **fp8,
    )


def _layer_spec(use_transformer_engine: bool) -> ModuleSpec:
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def _parameter_count(
    model: ModelConfig,
    tensor: int,
    layers: int,
    embedding: bool,
    final_norm: bool,
    output_layer: bool,
) -> int:
    """Parameters one tensor rank holds for ``layers`` blocks and the given end pieces."""
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    kv = model.kv_channels or h // heads
    attention = h * (heads + 2 * groups) * kv + heads * kv * h  # fused QKV, output projection
    mlp = h * 2 * model.ffn_hidden_size + model.ffn_hidden_size * h  # gate+up, down
    per_layer = (attention + mlp) // tensor + 2 * h  # two RMSNorm weights, replicated over TP
    vocab_h = model.vocab_size * h // tensor
    return (
        layers * per_layer
        + (vocab_h if embedding else 0)
        + (h if final_norm else 0)
        + (vocab_h if output_layer else 0)
    )


def count_parameters(model: ModelConfig) -> int:
    """Parameters of the full, unsharded model (a tied output layer is not counted twice)."""
    return _parameter_count(
        model,
        tensor=1,
        layers=model.num_layers,
        embedding=True,
        final_norm=True,
        output_layer=not model.tie_embeddings,
    )


class HiddenStateGPTModel(GPTModel):
    """megatron's GPTModel whose last stage returns the final-norm hidden states ``[S, B, H]``
    rather than logits or a loss; :meth:`output_weight` and ``output_layer`` turn them into
    vocab-parallel logits ``[S, B, V/TP]`` where the caller needs them."""

    def _postprocess(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        """This rank's vocab shard ``[V/TP, H]`` of the output layer's weight (the embedding's,
        when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    returns: Literal["logits", "hidden"] = "logits",
) -> GPTModel:
    """Build this rank's GPTModel chunk (after ``initialize_parallel``).

    ``pre_process``: the chunk holds the embedding; ``post_process``: the final norm and
    output layer. The last stage returns vocab-parallel logits ``[S, B, V/TP]`` (or the
    per-token loss given labels), or with ``returns="hidden"`` the final-norm hidden states
    (:class:`HiddenStateGPTModel`). The built parameter count is checked against the analytic
    one for this rank.
    """
    validate_layout(model, parallel, torch.distributed.get_world_size())
    config = transformer_config(model, parallel)
    gpt = (HiddenStateGPTModel if returns == "hidden" else GPTModel)(
        config=config,
        transformer_layer_spec=_layer_spec(_use_transformer_engine(model)),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    layers = model.num_layers // (parallel.pipeline * (parallel.virtual_pipeline or 1))
    expected = _parameter_count(
        model,
        tensor=parallel.tensor,
        layers=layers,
        embedding=pre_process,
        final_norm=post_process,
        # A tied output layer owns a weight copy only on a stage without the embedding.
        output_layer=post_process and not (model.tie_embeddings and pre_process),
    )
    built = sum(p.numel() for p in gpt.parameters())
    assert len(gpt.decoder.layers) == layers and built == expected, (
        f"built GPT chunk has {len(gpt.decoder.layers)} layers and {built} parameters; "
        f"the Llama formula for this rank gives {layers} layers and {expected}"
    )
    return gpt


def build_model_chunks(
    model: ModelConfig, parallel: ParallelConfig, returns: Literal["logits", "hidden"] = "logits"
) -> list[GPTModel]:
    """This rank's model chunks: one, or one per virtual pipeline stage (interleaved 1F1B);
    ``returns`` as in :func:`build_gpt_model`."""
    stages = range(parallel.virtual_pipeline) if parallel.virtual_pipeline else [None]
    return [
        build_gpt_model(
            model,
            parallel,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=stage
            ),
            vp_stage=stage,
            returns=returns,
        )
        for stage in stages
    ]
