"""Where a student starts and what it may see: the start message, `train.init` from a Hugging Face
directory, `train.max_samples`, and the random init (megatron's scaled output projections or
Hugging Face's plain one) in both engines.

Training runs are tiny LM-only megatron runs in this process (one rank, real loader and data).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_train import metrics

from kdscale.cli import main
from kdscale.config import ModelConfig, ParallelConfig
from kdscale.config.model import checkpoint_fields
from kdscale.data.manifest import SplitRecord, load_tokens_manifest
from kdscale.data.shards import TokenShardWriter, sample_key
from kdscale.data.store import TokenStore
from kdscale.models import build_gpt_model
from kdscale.models.hf_convert import hf_config_to_model
from kdscale.models.parallel import parallel_session
from kdscale.train.evaluate import evaluate_model

MODEL = {
    "model.num_layers": 2, "model.hidden_size": 64, "model.ffn_hidden_size": 176,
    "model.num_attention_heads": 4, "model.num_query_groups": 2, "model.vocab_size": 49152,
    "model.max_position_embeddings": 64,
}  # fmt: skip
TRAIN = {"train.global_batch": 4, "train.micro_batch": 2, "train.log_every": 1,
         "train.save_every": 0, "wandb.enabled": False}  # fmt: skip


def train(
    capsys: pytest.CaptureFixture[str], tokens: Path, out: Path, **sets: object
) -> tuple[int, str]:
    """`kdscale train` in this process; (exit status, what it wrote to stderr)."""
    values = MODEL | TRAIN | {"train.tokens": str(tokens), "train.out": str(out)} | sets
    argv = ["train"] + [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    status = main(argv)
    return status, capsys.readouterr().err


def first_samples(tokens: Path, out: Path, count: int) -> Path:
    """A token set whose train split is the first ``count`` samples of ``tokens`` (written by the
    real shard writer) and whose eval split is the same."""
    manifest = load_tokens_manifest(tokens)
    store = TokenStore(tokens, manifest, "train")
    out.mkdir()
    shards: list = []
    writer = TokenShardWriter(out, "train", count, np.dtype(manifest.dtype), shards.append)
    for i in range(count):
        sample = store.tokens(i)
        writer.write(sample_key(sample), sample)
    writer.close()
    store.close()
    for shard in manifest.splits["eval"].shards:
        shutil.copy(tokens / shard.name, out / shard.name)
    train_split = SplitRecord(samples=count, tokens=count * manifest.seq_len, shards=shards)
    splits = {"train": train_split, "eval": manifest.splits["eval"]}
    manifest.model_copy(update={"splits": splits}).write(out)
    return out


def test_max_samples_trains_on_exactly_the_first_n_samples(
    tmp_path: Path, tiny_tokens_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    available = load_tokens_manifest(tiny_tokens_dir).splits["train"].samples
    capped = tmp_path / "capped"
    status, err = train(capsys, tiny_tokens_dir, capped,
                        **{"train.steps": 3, "train.max_samples": 4})  # fmt: skip
    assert status == 0, err
    assert (
        "student starts from a random init (model.init_method_std=0.02, "
        "model.scaled_output_init=true, train.seed=1234); set train.init to start from a model"
    ) in err
    assert (
        f"data: the first 4 of {available} training samples (train.max_samples), "
        "3 steps × 4 samples = 3 epochs"
    ) in err
    alone = tmp_path / "alone"  # a token set that holds only those 4 samples
    status, err = train(capsys, first_samples(tiny_tokens_dir, tmp_path / "first4", 4), alone,
                        **{"train.steps": 3})  # fmt: skip
    assert status == 0, err
    losses = metrics(capped, "loss/total")
    assert sorted(losses) == [1, 2, 3] and losses == metrics(alone, "loss/total")  # bit for bit

    status, err = train(capsys, tiny_tokens_dir, capped,
                        **{"train.steps": 5, "train.max_samples": 8})  # fmt: skip
    assert status == 2 and "train.max_samples=8: the run in" in err and "max_samples=4" in err
    status, err = train(capsys, tiny_tokens_dir, tmp_path / "x",
                        **{"train.max_samples": available + 1})  # fmt: skip
    errors = [line for line in err.splitlines() if " WARNING " not in line]  # the no-cache note
    assert status == 2 and len(errors) == 1
    assert f"train.max_samples={available + 1} exceeds the {available} training samples" in err


def test_train_init_takes_a_hugging_face_directory_and_says_so(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    tiny_teacher_imported: Path,
    tiny_tokens_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    teacher = hf_config_to_model(json.loads((tiny_teacher_dir / "config.json").read_text()))
    fields = teacher.model_dump(include=set(checkpoint_fields()))
    shape = {f"model.{k}": v for k, v in fields.items()}
    out = tmp_path / "from-hf"
    start = {"train.steps": 0, "train.init": str(tiny_teacher_dir)}
    status, err = train(capsys, tiny_tokens_dir, out, **shape, **start)
    assert status == 0, err
    assert f"student starts from the weights of {tiny_teacher_imported} (train.init)" in err
    # The run's initial model is the imported HF model: the same held-out loss.
    ours = evaluate_model(out, tiny_tokens_dir, limit=4)
    assert ours.lm_loss == evaluate_model(tiny_teacher_dir, tiny_tokens_dir, limit=4).lm_loss


@pytest.mark.parametrize("scaled", [True, False])
def test_random_init_scales_output_projections_as_configured_in_both_engines(scaled: bool) -> None:
    from kdscale.train.deepspeed_engine.start import Start, build_student

    model = ModelConfig(num_layers=8, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                        num_query_groups=4, vocab_size=256, scaled_output_init=scaled)  # fmt: skip
    projections = 0.02 / math.sqrt(2 * 8) if scaled else 0.02  # 0.005: megatron's, 0.02: HF's
    with parallel_session(ParallelConfig()):
        gpt = build_gpt_model(model, ParallelConfig(), pre_process=True, post_process=True)
        layer = gpt.decoder.layers[3]
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
