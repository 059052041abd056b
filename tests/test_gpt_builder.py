"""Checks of the GPT builder: layout validation, the TransformerConfig mapping, backend errors
and the analytic parameter count (against transformers' Llama), all in-process; and, on a GPU
only, the Transformer Engine spec (bf16, fp8) built and run in a spawned rank.

The CPU-built model's parameter count is checked in tests/test_megatron_cpu.py (needs ranks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdscale.config import ModelConfig, ParallelConfig
from kdscale.errors import KDScaleError
from kdscale.models import (
    build_model_chunks,
    count_parameters,
    transformer_config,
    validate_layout,
)
from kdscale.models.parallel import destroy_parallel, initialize_parallel
from tests.dist import run_distributed

LLAMA = ModelConfig(
    num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2
)


@pytest.mark.parametrize(
    "parallel, world_size",
    [
        (ParallelConfig(), 1),
        (ParallelConfig(tensor=2), 2),
        (ParallelConfig(tensor=2, pipeline=2), 8),
        (ParallelConfig(pipeline=2, virtual_pipeline=2), 2),
    ],
)
def test_validate_layout_accepts(parallel: ParallelConfig, world_size: int) -> None:
    validate_layout(LLAMA, parallel, world_size)


TP2, TP4, PP2 = ParallelConfig(tensor=2), ParallelConfig(tensor=4), ParallelConfig(pipeline=2)


@pytest.mark.parametrize(
    "model_changes, parallel, world_size, reason",
    [
        ({}, ParallelConfig(tensor=2, pipeline=2), 6, "world size 6 is not divisible by "
         "parallel.tensor × parallel.pipeline = 2×2 = 4"),
        ({"num_attention_heads": 6, "num_query_groups": 6, "hidden_size": 96}, TP4, 4,
         "model.num_attention_heads=6 is not divisible by parallel.tensor=4"),
        ({}, TP4, 4, "model.num_query_groups=2 is not divisible by parallel.tensor=4"),
        ({"ffn_hidden_size": 177}, TP2, 2, "model.ffn_hidden_size=177 is not divisible by "
         "parallel.tensor=2"),
        ({"vocab_size": 255}, TP2, 2, "model.vocab_size=255 is not divisible by "
         "parallel.tensor=2 (the vocabulary is split evenly over tensor ranks and never padded"),
        ({"num_layers": 3}, PP2, 2, "model.num_layers=3 is not divisible by parallel.pipeline=2"),
        ({}, ParallelConfig(pipeline=2, virtual_pipeline=4), 2, "model.num_layers=4 is not "
         "divisible by parallel.pipeline=2 × parallel.virtual_pipeline=4"),
        ({}, ParallelConfig(virtual_pipeline=2), 1, "parallel.virtual_pipeline=2 needs "
         "parallel.pipeline >= 2"),
    ],
)  # fmt: skip
def test_validate_layout_names_the_problem(
    model_changes: dict, parallel: ParallelConfig, world_size: int, reason: str
) -> None:
    model = LLAMA.model_copy(update=model_changes)
    with pytest.raises(KDScaleError) as err:
        validate_layout(model, parallel, world_size)
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_layout_reports_every_problem_at_once() -> None:
    model = LLAMA.model_copy(update={"vocab_size": 255, "num_layers": 3})
    with pytest.raises(KDScaleError, match="vocab_size=255.*; model.num_layers=3"):
        validate_layout(model, ParallelConfig(tensor=2, pipeline=2), 4)


def test_transformer_config_is_llama_on_cpu() -> None:
    config = transformer_config(LLAMA, ParallelConfig(tensor=2, pipeline=2, virtual_pipeline=2))
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == LLAMA.norm_epsilon
    assert config.gated_linear_unit and config.activation_func is F.silu  # SwiGLU
    assert not config.add_bias_linear and not config.add_qkv_bias
    assert (config.num_attention_heads, config.num_query_groups) == (4, 2)
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size) == (2, 2)
    assert config.virtual_pipeline_model_parallel_size == 2
    assert config.params_dtype is torch.float32 and not config.bf16 and config.fp8 is None
    assert config.use_cpu_initialization
    assert not config.batch_p2p_comm  # gloo: unbatched p2p (see gpt.transformer_config)
    assert not config.sequence_parallel


def test_transformer_config_bf16() -> None:
    config = transformer_config(LLAMA.model_copy(update={"precision": "bf16"}), ParallelConfig())
    assert (
        config.bf16
        and config.params_dtype is torch.bfloat16
        and config.pipeline_dtype is torch.bfloat16
    )


NEEDS_TE = "needs Transformer Engine on a CUDA GPU; this machine has no CUDA GPU"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"precision": "fp8"}, f"model.precision='fp8' {NEEDS_TE} and no importable "
         "transformer_engine"),
        ({"transformer_impl": "transformer_engine"},
         f"model.transformer_impl='transformer_engine' {NEEDS_TE}"),
        ({"precision": "fp8", "transformer_impl": "local"}, "model.precision='fp8' needs "
         "Transformer Engine, but model.transformer_impl='local'"),
    ],
)  # fmt: skip
def test_missing_transformer_engine_fails_before_building(changes: dict, message: str) -> None:
    with pytest.raises(KDScaleError) as err:
        transformer_config(LLAMA.model_copy(update=changes), ParallelConfig())
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_channels", [None, 24])
def test_count_parameters_matches_transformers_llama(tie: bool, kv_channels: int | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LLAMA.model_copy(update={"tie_embeddings": tie, "kv_channels": kv_channels})
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_query_groups,
            head_dim=kv_channels or model.hidden_size // model.num_attention_heads,
            tie_word_embeddings=tie,
        )
    )
    assert count_parameters(model) == sum(p.numel() for p in hf.parameters())


def _build_with_transformer_engine(rank: int, world_size: int, model: ModelConfig) -> float:
    initialize_parallel(ParallelConfig(), seed=0)
    (gpt,) = build_model_chunks(model, ParallelConfig())  # asserts the parameter count
    tokens = torch.randint(0, model.vocab_size, (2, 33), device="cuda")
    loss = gpt(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean().item()
    destroy_parallel()
    return loss


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_transformer_engine_spec_builds_and_runs(precision: str) -> None:
    model = LLAMA.model_copy(
        update={"precision": precision, "transformer_impl": "transformer_engine"}
    )
    (loss,) = run_distributed(_build_with_transformer_engine, world_size=1, args=(model,))
    assert 4.0 < loss < 7.0  # about ln(256) = 5.5 for a fresh model
