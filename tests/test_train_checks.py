"""`kdscale train` refuses bad runs before any work, with one line naming what is wrong.

Every case runs the real CLI in this process on the real tiny token set and Ray-made cache; a
refused run exits with status 2, prints one line, and leaves no run directory behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdscale.cache.manifest import CacheManifest
from kdscale.cli import main
from tests.helpers_train import TINY_TRAIN_SETS


def refused(capsys: pytest.CaptureFixture[str], out: Path, tokens: Path, cache: Path | None,
            *sets: str) -> str:  # fmt: skip
    args = ["train", "--tokens", str(tokens), "--out", str(out)]
    if cache is not None:
        args += ["--cache", str(cache)]
    for item in [*TINY_TRAIN_SETS, *sets]:
        args += ["--set", item]
    status = main(args)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdscale train: error: ")
    assert not out.exists()  # refused before any work
    return err


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "run"


def test_cache_of_another_tokenizer_is_refused(
    capsys, out, tmp_path, tiny_tokens_dir, tiny_cache_dir
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache_dir, cache)
    body = json.loads((cache / "manifest.json").read_text())
    body.pop("fingerprint")
    body["header"]["tokenizer_fingerprint"] = "0" * 64  # as if made with another tokenizer
    CacheManifest.model_validate(body).write(cache)
    err = refused(capsys, out, tiny_tokens_dir, cache)
    assert "tokenizer_fingerprint" in err and "0000000000" in err


def test_cache_of_another_teacher_is_refused(capsys, out, tiny_tokens_dir, tiny_cache_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, tiny_cache_dir, "train.teacher_fingerprint=abc123")
    assert "teacher_fingerprint" in err and "'abc123'" in err


def test_cache_of_another_vocabulary_is_refused(
    capsys, out, tiny_tokens_dir, tiny_cache_dir
) -> None:
    err = refused(capsys, out, tiny_tokens_dir, tiny_cache_dir, "model.vocab_size=49154")
    assert "vocab_size: cache" in err and "49152" in err and "49154" in err


def test_cache_at_another_temperature_is_refused(
    capsys, out, tiny_tokens_dir, tiny_cache_dir
) -> None:
    err = refused(capsys, out, tiny_tokens_dir, tiny_cache_dir, "loss.temperature=2.0")
    assert "loss.temperature=2.0" in err and "temperature 1.0" in err


def test_heads_not_divisible_by_tensor_parallel_are_refused(capsys, out, tiny_tokens_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "parallel.tensor=3", "train.nproc_per_node=3")
    assert "model.num_attention_heads=4 is not divisible by parallel.tensor=3" in err


def test_layers_not_divisible_by_pipeline_are_refused(capsys, out, tiny_tokens_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "model.num_layers=3", "parallel.pipeline=2",
                  "train.nproc_per_node=2")  # fmt: skip
    assert "model.num_layers=3 is not divisible by parallel.pipeline=2" in err


def test_batch_that_does_not_split_is_refused(capsys, out, tiny_tokens_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "train.global_batch=6",
                  "train.nproc_per_node=2")  # fmt: skip
    assert "train.global_batch=6 is not a multiple of" in err and "2×2 = 4" in err


def test_sequence_longer_than_the_model_is_refused(capsys, out, tiny_tokens_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "model.max_position_embeddings=16")
    assert "model.max_position_embeddings=16" in err and "seq_len 32" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine may run FP8")
def test_fp8_without_transformer_engine_fails_first(capsys, out, tiny_tokens_dir) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "model.precision=fp8")
    assert "model.precision='fp8' needs Transformer Engine on a CUDA GPU" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="Transformer Engine may be present")
def test_distributed_optimizer_without_transformer_engine_fails_first(
    capsys, out, tiny_tokens_dir
) -> None:
    err = refused(capsys, out, tiny_tokens_dir, None, "train.use_distributed_optimizer=true")
    assert "train.use_distributed_optimizer=true needs Transformer Engine or Apex" in err


def test_missing_tokens_are_refused(capsys, out, tmp_path) -> None:
    err = refused(capsys, out, tmp_path / "nothing", None)
    assert "no manifest.json" in err
