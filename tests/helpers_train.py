"""Helpers shared by the training tests of both engines: config overrides, metrics.jsonl
curves, curve comparison, and stopping a `kdscale train` process with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kdscale.models.checkpoints import latest_checkpoint, read_train_state

REPO = Path(__file__).resolve().parents[1]


# --set items of a tiny student for `kdscale train` checks that stop before training.
TINY_TRAIN_SETS = [
    "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
    "model.max_position_embeddings=64", "train.global_batch=4", "train.micro_batch=2",
    "wandb.enabled=false",
]  # fmt: skip


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def metrics(out: Path, key: str) -> dict[int, float]:
    """``key`` per step from metrics.jsonl, where every step is logged once (also when a
    resumed run redid steps logged before it was killed)."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            assert record["step"] not in found, f"{key} of step {record['step']} logged twice in {out}"
            found[record["step"]] = record[key]
    return found


def assert_close(
    got: dict[int, float], want: dict[int, float], steps: range, rtol: float = 1e-5
) -> None:
    assert sorted(got) == list(steps)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in steps], dtype=torch.float64),
        torch.tensor([want[s] for s in steps], dtype=torch.float64),
        rtol=rtol,
        atol=0,
    )


def stop_then_rerun(values: dict[str, Any], out: Path, sig: int = signal.SIGTERM) -> int:
    """Start `kdscale train` with ``values`` and stop it with ``sig``: SIGTERM once a step is
    logged (it must save and exit 0), SIGKILL once a checkpoint exists (it dies at once). Rerun
    the same command to the end; return the step the rerun resumed from."""
    command = [sys.executable, "-m", "kdscale.cli", "train"]
    for item in overrides(values):
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(command, env=env, cwd=REPO)

    def ready() -> bool:
        if sig == signal.SIGKILL:
            return latest_checkpoint(out) is not None
        return (out / "metrics.jsonl").is_file() and bool((out / "metrics.jsonl").read_text())

    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    stopped_at = read_train_state(latest_checkpoint(out))["step"]
    assert subprocess.run(command, env=env, cwd=REPO).returncode == 0
    return stopped_at
