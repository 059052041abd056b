"""HF Llama ↔ kdscale model directories: exact tensor round trips and logits equal to transformers.

Real parts only: transformers' LlamaForCausalLM, megatron-core's GPTModel (local spec) built by
kdscale, dist_checkpointing, and the `kdscale import-hf` / `export-hf` commands.

Tolerance: HF and megatron run the same fp32 math in different kernels (fused QKV GEMM vs three,
megatron's RoPE and softmax vs HF's), so logits differ in the last bits: measured 5.2e-5 max
absolute on the SmolLM2 fixture (logits of magnitude ~20, 30 layers) and < 1e-5 on the tiny
models. 1e-4 sits above that; a wrong head order, a swapped gate/up or a missing norm moves
logits by > 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kdscale.cli import main
from kdscale.config import ModelConfig, ParallelConfig
from kdscale.errors import KDScaleError
from kdscale.hub import resolve_model_dir
from kdscale.models.hf_convert import fuse_qkv, hf_config_to_model, split_qkv
from kdscale.models.hf_io import read_hf_dir
from kdscale.models.checkpoints import (
    check_architecture,
    read_model_config,
    read_run_config,
    resolve_checkpoint,
)
from tests.dist import run_distributed

ATOL = 1e-4


def megatron_logits(model_dir: Path, tokens: torch.Tensor, tensor: int = 1) -> torch.Tensor:
    """Full-vocabulary logits [B, S, V] of a model directory, built at TP=``tensor``.

    Call in a process group of ``tensor`` ranks, or at TP=1 in a bare process.
    """
    from megatron.core import parallel_state

    from kdscale.models import build_gpt_model
    from kdscale.models.checkpoints import load_weights, open_model_dir
    from kdscale.models.parallel import parallel_session

    ckpt, model = open_model_dir(model_dir, "model_dir")
    parallel = ParallelConfig(tensor=tensor)

    def run() -> torch.Tensor:
        gpt = build_gpt_model(model, parallel, pre_process=True, post_process=True).eval()
        load_weights(ckpt, [gpt])
        with torch.no_grad():
            local = gpt(tokens, None, None)  # [B, S, V/TP]
        parts = [torch.empty_like(local) for _ in range(tensor)]
        torch.distributed.all_gather(
            parts, local, group=parallel_state.get_tensor_model_parallel_group()
        )
        return torch.cat(parts, dim=-1)

    with parallel_session(parallel):
        return run()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def _round_trip(source: Path | str, tmp_path: Path) -> tuple[Path, Path]:
    model_dir, exported = tmp_path / "model", tmp_path / "exported"
    assert main(["import-hf", str(source), str(model_dir)]) == 0
    assert main(["export-hf", str(model_dir), str(exported)]) == 0
    return model_dir, exported


def _assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    _, a = read_hf_dir(a_dir)
    _, b = read_hf_dir(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_smollm2_round_trip(smollm2_dir: Path, tmp_path: Path) -> None:
    model_dir, exported = _round_trip("smollm2-135m", tmp_path)  # the fixture, by name
    _assert_same_tensors(smollm2_dir, exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "The capital of France is Paris, and the capital of Germany is"
    assert (
        tokenizer(text)["input_ids"]
        == AutoTokenizer.from_pretrained(smollm2_dir)(text)["input_ids"]
    )
    tokens = torch.tensor([tokenizer(text)["input_ids"]])

    reference = hf_logits(smollm2_dir, tokens)
    ours = megatron_logits(model_dir, tokens)
    assert ours.shape == reference.shape == (1, tokens.shape[1], 49152)
    torch.testing.assert_close(ours, reference, rtol=0, atol=ATOL)
    torch.testing.assert_close(hf_logits(exported, tokens), ours, rtol=0, atol=ATOL)
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == 2


def make_tiny_llama(out: Path, tie: bool = False, seed: int = 0) -> Path:
    """A random untied Llama whose head width (16) is not hidden/heads (48/4): kv_channels path."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        rope_theta=5e5,
        rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm changes the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


def _tokens(vocab: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(3))


def test_tiny_untied_round_trip(tmp_path: Path) -> None:
    hf_dir = make_tiny_llama(tmp_path / "hf")
    model_dir, exported = _round_trip(hf_dir, tmp_path)
    _assert_same_tensors(hf_dir, exported)
    # A step-0 training checkpoint: `kdscale train --set train.init=DIR` accepts it as is.
    ckpt = resolve_checkpoint(model_dir, "train.init")
    model = read_model_config(ckpt)
    check_architecture(ckpt, model, "train.init")
    assert (model.kv_channels, model.tie_embeddings, model.rotary_base) == (16, False, 5e5)
    assert read_run_config(ckpt).model == model
    tokens = _tokens(128)
    reference = hf_logits(hf_dir, tokens)
    torch.testing.assert_close(megatron_logits(model_dir, tokens), reference, rtol=0, atol=ATOL)
    torch.testing.assert_close(hf_logits(exported, tokens), reference, rtol=0, atol=0)
    named = tmp_path / "with-tokenizer"  # --tokenizer takes a fixture name like every model option
    assert main(["export-hf", str(model_dir), str(named), "--tokenizer", "smollm2-135m"]) == 0
    assert (named / "tokenizer.json").read_bytes() == (
        resolve_model_dir("smollm2-135m") / "tokenizer.json"
    ).read_bytes()


def _tp_worker(rank: int, world_size: int, model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    return megatron_logits(model_dir, tokens, tensor=world_size)


def test_imported_checkpoint_loads_at_tp2(tmp_path: Path) -> None:
    hf_dir = make_tiny_llama(tmp_path / "hf", tie=True, seed=1)
    model_dir = tmp_path / "model"
    assert main(["import-hf", str(hf_dir), str(model_dir)]) == 0
    tokens = _tokens(128)
    single = megatron_logits(model_dir, tokens)
    tp2 = run_distributed(_tp_worker, world_size=2, args=(model_dir, tokens))
    for logits in tp2:
        torch.testing.assert_close(logits, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(single, hf_logits(hf_dir, tokens), rtol=0, atol=ATOL)


def test_fused_qkv_layout_is_per_group() -> None:
    """Rows of the fused weight: [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1]."""
    model = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=1)
    q = torch.tensor([[10.0 + h] * 8 for h in range(4)])
    k = torch.tensor([[20.0 + g] * 8 for g in range(2)])
    v = torch.tensor([[30.0 + g] * 8 for g in range(2)])
    fused = fuse_qkv(q, k, v, model)
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    for a, b in zip(split_qkv(fused, model), (q, k, v)):
        assert torch.equal(a, b)


BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}


@pytest.mark.parametrize(
    ("update", "field"),
    [
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
            "rope_parameters.rope_type",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
    ],
)
def test_unsupported_hf_configs_are_refused(update: dict, field: str) -> None:
    assert hf_config_to_model(BASE).num_query_groups == 2
    with pytest.raises(KDScaleError, match=field.replace(".", r"\.")):
        hf_config_to_model(BASE | update)


def test_import_of_a_non_model_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["import-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
