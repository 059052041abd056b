"""`kdscale train` on one CUDA GPU with Transformer Engine: bf16 and FP8 KD steps, and the
distributed optimizer's checkpoint (its CPU path is refused: megatron needs TE or Apex there).

Skipped where no GPU is present (run with ``pytest -m gpu`` on a GPU machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
SETS = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
    "model.max_position_embeddings=64", "model.transformer_impl=transformer_engine",
    "train.global_batch=4", "train.micro_batch=2", "train.log_every=1", "train.save_every=0",
    "wandb.enabled=false",
]  # fmt: skip


def train(tokens: Path, cache: Path, out: Path, *sets: str) -> dict[int, float]:
    command = [sys.executable, "-m", "kdscale.cli", "train", "--tokens", str(tokens),
               "--cache", str(cache), "--out", str(out)]  # fmt: skip
    for item in [*SETS, *sets]:
        command += ["--set", item]
    # Deterministic TE kernels: a resumed run must repeat the straight one exactly.
    env = os.environ | {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}
    subprocess.run(command, cwd=REPO, env=env, check=True)
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            losses[record["step"]] = record["loss/total"]
    return losses


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_kd_steps_run_in_low_precision(
    tmp_path, tiny_tokens_dir, tiny_cache_dir, precision
) -> None:
    losses = train(tiny_tokens_dir, tiny_cache_dir, tmp_path / "run", "train.steps=3",
                   f"model.precision={precision}")  # fmt: skip
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())


def test_distributed_optimizer_resumes_exactly(tmp_path, tiny_tokens_dir, tiny_cache_dir) -> None:
    sets = ("train.steps=4", "train.use_distributed_optimizer=true")  # fp32
    straight = train(tiny_tokens_dir, tiny_cache_dir, tmp_path / "straight", *sets)
    out = tmp_path / "resumed"
    train(tiny_tokens_dir, tiny_cache_dir, out, *sets, "train.exit_interval=2")
    resumed = train(tiny_tokens_dir, tiny_cache_dir, out, *sets)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)
