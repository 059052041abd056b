"""Damaged, tampered and foreign checkpoints, loaded by every command that loads one.

Each case damages a copy of the session's 2-step run (a real megatron dist_checkpointing
checkpoint with ``checksums.json``). Every damage kind is loaded by ``kdscale eval``; one flipped
``.distcp`` is also loaded by every other loader (resume, ``train.init``, ``export-hf``,
``prune``, the megatron teacher of ``kdscale cache``). Each must be one line naming the file,
with nothing loaded, run or written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_STUDENT
from helpers_integrity import Touch, assert_one_line_error, flip, run_cli

from kdscale.integrity import write_checksums
from kdscale.models.checkpoints import latest_checkpoint

STEP = "checkpoints/step_000000002"


@pytest.fixture
def run_copy(tmp_path, tiny_run_dir) -> Path:
    shutil.copytree(tiny_run_dir, tmp_path / "run")
    return tmp_path / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def _sets(*extra: str) -> list[str]:
    return [a for s in (*TINY_STUDENT, *extra) for a in ("--set", s)]


# damage name -> (what to do to the run copy, text the one-line error must hold)
DAMAGES = {
    "64 flipped bytes in a .distcp": (lambda r: flip(r / STEP / "__0_0.distcp", 4096, 64, 997),
                                      "__0_0.distcp is corrupt"),
    "truncated .distcp": (lambda r: _truncate(r / STEP / "__0_1.distcp"), "__0_1.distcp is"),
    "truncated common.pt": (lambda r: _truncate(r / STEP / "common.pt"), "common.pt is"),
    "flipped .metadata": (lambda r: flip(r / STEP / ".metadata", 200), ".metadata is corrupt"),
    "truncated train_state.json": (lambda r: _truncate(r / STEP / "train_state.json"),
                                   "train_state.json is damaged"),
    "non-UTF-8 train_state.json": (lambda r: flip(r / STEP / "train_state.json", 3),
                                   "train_state.json is damaged"),
    "truncated RNG file": (lambda r: _truncate(r / STEP / "rng" / "tp0-pp0-dp0.pt"),
                           "tp0-pp0-dp0.pt is"),
    "non-UTF-8 model.yaml": (lambda r: flip(r / STEP / "model.yaml", 2), "model.yaml is damaged"),
    "non-UTF-8 latest": (lambda r: flip(r / "checkpoints" / "latest", 1), "latest"),
    "latest outside the run": (lambda r: (r / "checkpoints" / "latest").write_text("/etc\n"),
                               "not a step directory of this run"),
    "latest climbing out": (lambda r: (r / "checkpoints" / "latest").write_text("../../x\n"),
                            "not a step directory of this run"),
    "a file removed": (lambda r: (r / STEP / "__0_1.distcp").unlink(), "__0_1.distcp is missing"),
    "a file added": (lambda r: (r / STEP / "extra.pt").write_bytes(b"x"),
                     "extra.pt is not in checksums.json"),
    "checksums.json removed": (lambda r: (r / STEP / "checksums.json").unlink(),
                               "checksums.json is missing"),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_eval_names_every_kind_of_damage(run_copy, tiny_tokens_dir, capsys, damage):
    do, named = DAMAGES[damage]
    do(run_copy)
    status, out, err = run_cli(capsys, "eval", str(run_copy), "--data", str(tiny_tokens_dir),
                               "--max-samples", "4")  # fmt: skip
    assert_one_line_error(status, err, named)
    assert "LM loss" not in out


FLIPPED = DAMAGES["64 flipped bytes in a .distcp"]


def test_every_loader_refuses_a_flipped_checkpoint(
    run_copy, tmp_path, tiny_tokens_dir, tiny_teacher_dir, capsys
):
    FLIPPED[0](run_copy)
    named = FLIPPED[1]
    loads = {
        "resume": ["train", "--tokens", str(tiny_tokens_dir), "--out", str(run_copy),
                   "--steps", "3", *_sets()],
        "train.init": ["train", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "new"),
                       "--steps", "1", *_sets(f"train.init={run_copy}")],
        "export-hf": ["export-hf", str(run_copy), str(tmp_path / "hf"),
                      "--tokenizer", str(tiny_teacher_dir)],
        "prune": ["prune", "--model", str(run_copy), "--tokens", str(tiny_tokens_dir),
                  "--out", str(tmp_path / "pruned"), "--layers", "1", "--samples", "4",
                  "--set", "wandb.enabled=false"],
        "teacher": ["cache", "--tokens", str(tiny_tokens_dir), "--out", str(tmp_path / "cache"),
                    "--teacher", str(run_copy), "--set", "cache.teacher.backend=megatron",
                    "--set", f"cache.teacher.tokenizer={tiny_teacher_dir}"],
    }  # fmt: skip
    for load, argv in loads.items():
        status, _, err = run_cli(capsys, *argv)
        assert_one_line_error(status, err, named)
    assert latest_checkpoint(run_copy).name == "step_000000002"  # nothing resumed or saved
    assert not any((tmp_path / d).exists() for d in ("hf", "pruned", "cache"))
    assert not list((tmp_path / "new").glob("checkpoints/step_*"))


def test_a_pickle_in_the_rng_file_is_never_run(run_copy, tiny_tokens_dir, tmp_path, capsys):
    marker = tmp_path / "executed"
    step = run_copy / STEP
    torch.save({"python": Touch(marker)}, step / "rng" / "tp0-pp0-dp0.pt")
    write_checksums(step)  # whoever planted it can reseal the checksums too
    status, _, err = run_cli(capsys, "train", "--tokens", str(tiny_tokens_dir), "--out",
                             str(run_copy), "--steps", "3", *_sets())  # fmt: skip
    assert_one_line_error(status, err, "tp0-pp0-dp0.pt: not a kdscale RNG state file")
    assert not marker.exists()


def test_skipping_checksums_takes_an_explicit_flag(run_copy, tiny_tokens_dir, capsys):
    FLIPPED[0](run_copy)
    status, out, err = run_cli(capsys, "eval", str(run_copy), "--data", str(tiny_tokens_dir),
                               "--max-samples", "4", "--skip-checksums")  # fmt: skip
    assert status == 0, err
    assert "LM loss" in out and "without verifying its checksums" in err


@pytest.mark.parametrize("log_every", [1, 10], ids=["found-at-log-step", "found-before-save"])
def test_a_non_finite_loss_stops_training_and_saves_nothing_more(
    tmp_path, tiny_tokens_dir, capsys, log_every
):
    out = tmp_path / "run"
    status, _, err = run_cli(capsys, "train", "--tokens", str(tiny_tokens_dir), "--out", str(out),
                             "--steps", "4", *_sets("train.lr.lr=1e30", "train.save_every=1",
                                                    f"train.log_every={log_every}"))  # fmt: skip
    assert_one_line_error(status, err, "is not finite", "stopping without saving them")
    assert latest_checkpoint(out).name == "step_000000001"  # the last finite step


def test_non_finite_config_numbers_are_refused(tmp_path, tiny_tokens_dir, capsys):
    for value in (".inf", "-.inf", ".nan"):
        status, _, err = run_cli(capsys, "train", "--tokens", str(tiny_tokens_dir), "--out",
                                 str(tmp_path / "run"), *_sets(f"train.lr.lr={value}"))  # fmt: skip
        assert_one_line_error(status, err, "train.lr.lr=", "finite number")
    assert not (tmp_path / "run").exists()
