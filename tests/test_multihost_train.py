"""Training across namespace hosts through SLURM: `kdscale submit RECIPE --launcher slurm --stage
train --nodes 2` (the torchrun template: one torchrun per host, one rank each).

One recipe and one initial model (a 0-step run: pipeline stages would otherwise draw their own
initial weights), then four runs made at once: the single-host reference (`kdscale train`, one
rank, on this machine), DP=2 and PP=2 across two hosts, and a DP=2 run whose rank on its second
host is killed with SIGKILL once a checkpoint exists. That job ends (FAILED), the same submission runs again and
resumes from the last complete checkpoint. Every run must log the reference's losses (fp32, 1e-5
relative, the bound of test_train.py), each step once, into one checkpoint series.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_cluster import LocalCluster
from kdscale.launch import slurm
from kdscale.models.checkpoints import latest_checkpoint, read_train_state, step_name
from tests.helpers_train import assert_close, metrics

pytestmark = pytest.mark.multihost
STEPS, SAVE_EVERY = 6, 2
RECIPE = {
    "model": {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 176, "num_attention_heads": 4,
              "num_query_groups": 2, "vocab_size": 49152, "max_position_embeddings": 64},
    "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 1, "log_every": 1, "save_every": SAVE_EVERY,
              "lr": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2}},
    "wandb": {"enabled": False},
}  # fmt: skip
LAYOUTS = {"dp2": [], "pp2": ["--set", "parallel.pipeline=2"], "killed": []}


def _submit(recipe: Path, root: Path, name: str) -> str:
    """`kdscale submit` of the recipe's train stage on two nodes; the job id."""
    command = [sys.executable, "-m", "kdscale.cli", "submit", str(recipe), "--launcher", "slurm", "--stage",
               "train", "--nodes", "2", "--log-dir", str(root / "logs"), "--job-name", name,
               "--set", f"train.out={root / name}", "--set", f"train.init={root / 'init'}",
               *LAYOUTS[name]]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _ranks_on(cluster: LocalCluster, host: str) -> list[int]:
    """The training ranks (not the torchrun agent) running on ``host``."""
    ranks = []
    for pid in cluster.pids_on(host):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "kdscale.cli train" in cmdline and "torch.distributed.run" not in cmdline:
            ranks.append(pid)
    return ranks


def _kill_ranks_after_first_save(cluster: LocalCluster, job_id: str, out: Path) -> str:
    """SIGKILL the ranks on the job's second host once a checkpoint exists; return that host."""
    deadline = time.monotonic() + 600
    while latest_checkpoint(out) is None:
        assert slurm.job_status(job_id).state in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.05)
    host = slurm.job_nodes(job_id)[1]
    ranks = _ranks_on(cluster, host)
    assert ranks, f"no rank on {host}"
    for pid in ranks:
        os.kill(pid, signal.SIGKILL)
    return host


@pytest.fixture(scope="module")
def runs(local_cluster: LocalCluster, module_tmp_path, tiny_tokens_dir: Path, tiny_cache_dir: Path) -> Path:
    root = module_tmp_path
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE | {"train": RECIPE["train"] | {
        "tokens": str(tiny_tokens_dir), "cache": str(tiny_cache_dir)}}))  # fmt: skip
    train = [sys.executable, "-m", "kdscale.cli", "train", "--config", str(recipe)]
    init = subprocess.run([*train, "--set", "train.steps=0", "--set", f"train.out={root / 'init'}"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert init.returncode == 0, init.stderr[-3000:]
    reference = subprocess.Popen([*train, "--set", f"train.out={root / 'ref'}", "--set", f"train.init={root / 'init'}"],
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    jobs = {name: _submit(recipe, root, name) for name in LAYOUTS}
    lost = _kill_ranks_after_first_save(local_cluster, jobs["killed"], root / "killed")
    results = {name: slurm.wait_job(job, timeout=900) for name, job in jobs.items()}
    (root / "killed.json").write_text(json.dumps({"job": jobs["killed"], "host": lost,
                                                  "state": results["killed"].state}))  # fmt: skip
    jobs["resumed"] = _submit(recipe, root, "killed")  # the same submission again
    results["resumed"] = slurm.wait_job(jobs["resumed"], timeout=900)
    _, err = reference.communicate(timeout=900)
    assert reference.returncode == 0, err[-3000:]
    (root / "jobs.json").write_text(json.dumps(jobs))
    for name, result in results.items():
        if name != "killed":
            log = (root / "logs" / f"{'killed' if name == 'resumed' else name}-{jobs[name]}.out").read_text()
            assert (result.state, result.exit_code) == ("COMPLETED", 0), log[-5000:]
    return root


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_two_hosts_reproduce_the_single_host_losses(runs: Path, layout: str) -> None:
    job = json.loads((runs / "jobs.json").read_text())[layout]
    assert len(set(slurm.job_nodes(job))) == 2
    for key, rtol in (("loss/total", 1e-5), ("optim/grad_norm", 5e-5)):
        assert_close(metrics(runs / layout, key), metrics(runs / "ref", key), range(1, STEPS + 1), rtol)
    saved = sorted(p.name for p in (runs / layout / "checkpoints").glob("step_*"))
    assert saved == [step_name(s) for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]  # one series
    assert latest_checkpoint(runs / layout).name == step_name(STEPS)
    layout_saved = read_train_state(latest_checkpoint(runs / layout))["layout"]
    assert (layout_saved["data"], layout_saved["pipeline"]) == ((2, 1) if layout == "dp2" else (1, 2))


def test_a_rank_killed_on_one_host_ends_the_job_and_the_same_submission_resumes(runs: Path) -> None:
    killed = json.loads((runs / "killed.json").read_text())
    resumed_job = json.loads((runs / "jobs.json").read_text())["resumed"]
    assert killed["state"] == "FAILED"
    log = (runs / "logs" / f"killed-{resumed_job}.out").read_text()
    checkpoint = Path(re.search(r"student resumes (\S+)", log).group(1))
    step = read_train_state(checkpoint)["step"]
    assert checkpoint.parent == runs / "killed" / "checkpoints" and SAVE_EVERY <= step < STEPS
    # metrics() also asserts that no step is logged twice, though steps after resumed_at ran twice.
    assert_close(metrics(runs / "killed", "loss/total"), metrics(runs / "ref", "loss/total"), range(1, STEPS + 1))
    saved = sorted(p.name for p in (runs / "killed" / "checkpoints").glob("step_*"))
    assert saved == [step_name(s) for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
