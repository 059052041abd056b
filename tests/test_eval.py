"""`kdscale eval CKPT --data TOKENS_DIR [--cache CACHE_DIR] [--json]` on a real checkpoint.

A 2-step LM-only run (in this process, one rank, logging to an offline W&B run) evaluates
itself at its last step; the command, given only the checkpoint and the token directory, must
report the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdscale.cli import main
from kdscale.config import KDLossConfig
from kdscale.data.manifest import load_tokens_manifest
from kdscale.train.evaluate import evaluate_model

SAMPLES = 8  # = train.eval_batches × train.global_batch
SETS = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
    "model.max_position_embeddings=64", "train.global_batch=4", "train.micro_batch=2",
    "train.eval_every=2", "train.eval_batches=2", "train.save_every=0", "wandb.enabled=true",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(module_tmp_path: Path, tiny_tokens_dir: Path) -> Path:
    out = module_tmp_path / "run"
    args = ["train", "--tokens", str(tiny_tokens_dir), "--out", str(out), "--steps", "2"]
    assert main(args + sum((["--set", s] for s in SETS), [])) == 0
    return out


def in_training_eval(run_dir: Path) -> dict[str, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(x for x in lines if "eval/lm_loss" in x)


def evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["eval", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_json_matches_the_evaluation_during_training(run_dir, tiny_tokens_dir, capsys) -> None:
    status, out, err = evaluate(capsys, str(run_dir), "--data", str(tiny_tokens_dir),
                                "--max-samples", str(SAMPLES), "--json")  # fmt: skip
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"tokens", "lm_loss", "ppl"}
    assert result["tokens"] == SAMPLES * 32
    during = in_training_eval(run_dir)
    assert result["lm_loss"] == pytest.approx(during["eval/lm_loss"], rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(result["lm_loss"]))


def test_cache_adds_the_kl_to_the_teacher(run_dir, tiny_tokens_dir, tiny_cache_dir, capsys) -> None:
    status, out, err = evaluate(capsys, str(run_dir / "checkpoints"), "--data",
                                str(tiny_tokens_dir), "--cache", str(tiny_cache_dir),
                                "--max-samples", str(SAMPLES), "--json")  # fmt: skip
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"tokens", "lm_loss", "ppl", "kl_teacher_tail", "kd_loss"}
    assert result["lm_loss"] == pytest.approx(in_training_eval(run_dir)["eval/lm_loss"], rel=1e-6)
    assert result["kl_teacher_tail"] > 1.0  # a 2-step student is far from the teacher
    # The run's loss is forward KL on the tail buckets: its KD loss is the fixed-definition KL.
    assert result["kd_loss"] == pytest.approx(result["kl_teacher_tail"], rel=1e-6)
    # Under another objective (renorm over the support) the KD loss changes, the KL does not.
    renorm = evaluate_model(run_dir, tiny_tokens_dir, cache_dir=tiny_cache_dir, limit=SAMPLES,
                            loss=KDLossConfig(missing_mass="renorm", kd_weight=0.5))  # fmt: skip
    assert renorm.kl_teacher_tail == pytest.approx(result["kl_teacher_tail"], rel=1e-6)
    assert renorm.kd_loss != pytest.approx(result["kd_loss"], rel=1e-2)


def test_plain_output_names_each_figure(run_dir, tiny_tokens_dir, capsys) -> None:
    status, out, _ = evaluate(capsys, str(run_dir), "--data", str(tiny_tokens_dir),
                              "--max-samples", "4")  # fmt: skip
    assert status == 0
    text = out.strip().splitlines()
    assert text[0] == "tokens evaluated: 128"
    assert text[1].startswith("LM loss:") and text[2].startswith("perplexity:")


def test_training_logged_an_offline_wandb_run(run_dir, tiny_tokens_dir) -> None:
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # no API key: offline
    blob = record.read_bytes()  # W&B's protobuf log holds the run config and metrics verbatim
    fingerprint = load_tokens_manifest(tiny_tokens_dir).fingerprint
    assert fingerprint.encode() in blob and b"throughput/mfu" in blob and b"eval/lm_loss" in blob


def test_not_a_checkpoint_is_one_line_error(tmp_path, tiny_tokens_dir, capsys) -> None:
    status, _, err = evaluate(capsys, str(tmp_path), "--data", str(tiny_tokens_dir))
    assert status == 2
    assert err.strip() == (
        f"kdscale eval: error: CKPT={str(tmp_path)!r} is not a model: expected a kdscale run "
        "directory with checkpoints/, a step or model directory holding train_state.json, a "
        "Hugging Face directory (config.json) or a fixture name (smollm2-135m)"
    )


def test_empty_split_is_refused(run_dir, tiny_tokens_dir, capsys) -> None:
    status, _, err = evaluate(capsys, str(run_dir), "--data", str(tiny_tokens_dir),
                              "--split", "test")  # fmt: skip
    assert status == 2 and "--split test" in err
