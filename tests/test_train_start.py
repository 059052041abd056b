"""The random init: megatron's scaled output projections or Hugging Face's plain one, in both
engines.
"""

from __future__ import annotations

import math

import pytest

from kdscale.config import ModelConfig, ParallelConfig
from kdscale.models import build_gpt_model
from kdscale.models.parallel import parallel_session


@pytest.mark.parametrize("scaled", [True, False])
def test_random_init_scales_output_projections_as_configured_in_both_engines(scaled: bool) -> None:
    from kdscale.train.deepspeed_engine.start import Start, build_student

    model = ModelConfig(num_layers=8, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                        num_query_groups=4, vocab_size=256, scaled_output_init=scaled)  # fmt: skip
    projections = 0.02 / math.sqrt(2 * 8) if scaled else 0.02  # 0.005: megatron's, 0.02: HF's
    with parallel_session(ParallelConfig()):
        layer = build_gpt_model(model, ParallelConfig(), pre_process=True, post_process=True).decoder.layers[3]
        megatron = {
            "qkv": layer.self_attention.linear_qkv.weight, "fc1": layer.mlp.linear_fc1.weight,
            "proj": layer.self_attention.linear_proj.weight, "fc2": layer.mlp.linear_fc2.weight,
        }  # fmt: skip
    hf = build_student(Start("random", None, model, None), seed=0).model.layers[3]
    transformers = {
        "qkv": hf.self_attn.q_proj.weight, "fc1": hf.mlp.gate_proj.weight,
        "proj": hf.self_attn.o_proj.weight, "fc2": hf.mlp.down_proj.weight,
    }  # fmt: skip
    for weights in (megatron, transformers):  # 65k-131k draws: the std is known to < 1%
        stds = {name: w.detach().float().std().item() for name, w in weights.items()}
        assert stds["qkv"] == pytest.approx(0.02, rel=0.03)
        assert stds["fc1"] == pytest.approx(0.02, rel=0.03)
        assert stds["proj"] == pytest.approx(projections, rel=0.03)
        assert stds["fc2"] == pytest.approx(projections, rel=0.03)
