"""`kdscale submit --launcher slurm` against a real Slurm: the local cluster of namespace hosts
(tools/local_cluster.sh, three nodes).

Rendering tests run everywhere. The cluster tests (marked ``multihost``) install slurm-wlm + munge
with apt-get when missing; they skip only where the cluster cannot be made (not root). Jobs are
followed by polling ``scontrol``, never ``--wait`` of sbatch. Multi-node training jobs (the
torchrun template) are in test_multihost_train.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers_cache import shard_bytes
from kdscale.cache.manifest import load_cache_manifest
from kdscale.cli import main
from kdscale.launch import slurm

REPO = Path(__file__).resolve().parents[1]
RECIPE = {
    "data": {"inputs": ["stdlib:python/json"], "tokenizer": "smollm2-135m", "seq_len": 32,
             "shard_samples": 64, "eval_fraction": 0.1},
    "wandb": {"enabled": False},
}
# The job step a preemption test runs in place of python: it records each start and SIGTERM,
# "checkpoints" on SIGTERM, and on a restart (SLURM_RESTART_COUNT >= 1) finishes at once.
STAND_IN_STEP = """#!/bin/bash
echo "start restart=${SLURM_RESTART_COUNT:-0} args=$*" >> "$STEP_LOG"
if (( ${SLURM_RESTART_COUNT:-0} >= 1 )); then echo resumed >> "$STEP_LOG"; exit 0; fi
sleep 300 & SLEEP=$!
trap 'echo "checkpoint on TERM" >> "$STEP_LOG"; kill $SLEEP; exit 0' TERM
wait $SLEEP
"""


def _recipe(tmp_path: Path, **data: object) -> Path:
    tree = {**RECIPE, "data": {**RECIPE["data"], "out": str(tmp_path / "tokens"), **data},
            "recipe": {"out": str(tmp_path / "run"), "stages": ["data"]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _submit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["submit", *argv])
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------------- rendering


def test_dry_run_prints_a_preemption_safe_script_and_submits_nothing(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    status, out, _ = _submit(
        capsys, str(recipe), "--launcher", "slurm", "--stage", "data", "--partition", "gpu",
        "--time", "02:00:00", "--account", "proj", "--signal-seconds", "600", "--gpus-per-node", "4",
        "--log-dir", str(tmp_path / "logs"), "--env", "HF_HOME=/shared/hf", "--dry-run",
    )
    assert status == 0
    lines = out.splitlines()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@600", "#SBATCH --partition=gpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --account=proj", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --nodes=1", "trap 'on_signal USR1' USR1", "trap 'on_signal TERM' TERM",
                 "# kdscale submit --env (in sbatch's environment, not written here): HF_HOME"):
        assert line in lines, line
    assert "/shared/hf" not in out  # --env values never enter the script
    assert '    scontrol requeue "$SLURM_JOB_ID"' in lines
    assert lines[-2].endswith(f"-m kdscale.cli data --config {recipe}")
    assert lines[-2].startswith("run_step ")
    assert "{{" not in out
    assert not (tmp_path / "logs").exists()  # nothing written, nothing submitted


def test_the_default_job_runs_the_whole_recipe(tmp_path, capsys):
    recipe = REPO / "configs" / "llama31-8b-to-4b-minitron-width.yaml"
    status, out, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--gpus-per-node", "8",
                             "--dry-run")
    assert status == 0
    assert out.splitlines()[-2].endswith(f"-m kdscale.cli run {recipe}")
    status, out, err = _submit(capsys, str(recipe), "--launcher", "slurm", "--nodes", "2", "--dry-run")
    assert status == 2 and "--nodes > 1 runs one stage on every node" in err


def test_multi_node_templates(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    _, torchrun, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--stage", "train",
                             "--nodes", "4", "--gpus-per-node", "8", "--dry-run")
    assert '#SBATCH --nodes=4' in torchrun.splitlines()
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)' in torchrun
    assert "run_step srun --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1" in torchrun
    assert "--nproc-per-node=8" in torchrun and '--rdzv-endpoint="$HEAD_NODE:$RDZV_PORT"' in torchrun
    assert "-m kdscale.cli train --config" in torchrun

    _, ray, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--stage", "cache",
                        "--nodes", "3", "--gpus-per-node", "8", "--dry-run")
    assert 'start --head --node-ip-address="$HEAD_IP"' in ray and '--exclude="$HEAD_NODE"' in ray
    assert 'cache --config ' in ray and '--set "cache.ray.address=$RAY_ADDRESS"' in ray


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0"], "--nodes 0: must be >= 1"),
        (["--time", "1-xx"], "--time '1-xx': expected minutes"),
        (["--time", "5", "--signal-seconds", "300"], "not longer than --signal-seconds 300"),
        (["--env", "1BAD=x"], "--env '1BAD=x': expected NAME=VALUE"),
        (["--stage", "nope"], "argument --stage: invalid choice: 'nope'"),
        (["--set", "data.seq_len=1"], "data.seq_len=1"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    status, out, err = _submit(capsys, str(_recipe(tmp_path)), "--launcher", "slurm", "--dry-run", *flags)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kdscale submit: error: ") and message in err


INJECTIONS = {
    "newline in --job-name": (["--job-name", "kd\ntouch {marker}"], "--job-name"),
    "newline in --partition": (["--partition", "gpu\ntouch {marker}"], "--partition"),
    "newline in --sbatch": (["--sbatch=--exclusive\ntouch {marker}"], "--sbatch"),
    "newline in --log-dir": (["--log-dir", "{tmp}/logs\ntouch {marker}"], "--log-dir"),
    "newline in the recipe name": (["--recipe-name", "r\ntouch pwned.yaml"], "--job-name"),
    "carriage return in --account": (["--account", "proj\r"], "--account"),
    "space in --job-name": (["--job-name", "two words"], "--job-name"),
    "not an option in --sbatch": (["--sbatch", "exclusive"], "expected an sbatch option"),
    "command substitution in --python": (["--python", "/usr/bin/python$(touch {marker})",
                                          "--stage", "cache", "--nodes", "2"], "--python"),
    "backquotes in --python": (["--python", "`touch {marker}`"], "--python"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_rendered_values_cannot_become_commands(tmp_path, capsys, case):
    marker = tmp_path / "pwned"
    flags, flag = INJECTIONS[case]
    flags = [f.format(marker=marker, tmp=tmp_path) for f in flags]
    recipe = _recipe(tmp_path)
    if flags[0] == "--recipe-name":  # the job name defaults to the recipe file's stem
        recipe, flags = recipe.rename(tmp_path / flags[1]), []
    status, out, err = _submit(capsys, str(recipe), "--launcher", "slurm", "--dry-run", *flags)
    assert status == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith("kdscale submit: error: ") and flag in err
    assert not marker.exists()


def test_time_limit_formats():
    assert [slurm.time_limit_seconds(t) for t in ("90", "10:30", "1:00:00", "2-3", "1-00:01", "0-0:0:7")] == [
        5400, 630, 3600, 2 * 86400 + 3 * 3600, 86400 + 60, 7]


# ---------------------------------------------------------------------------------- real SLURM


@pytest.mark.multihost
def test_more_nodes_than_the_cluster_has_is_a_one_line_error(local_cluster, tmp_path, capsys):
    status, out, err = _submit(capsys, str(_recipe(tmp_path)), "--launcher", "slurm", "--stage", "train",
                               "--nodes", "4", "--log-dir", str(tmp_path / "logs"))
    assert status == 2 and out == ""
    assert err == "kdscale submit: error: --nodes 4: partition debug has 3 nodes\n"
    assert not (tmp_path / "logs").exists()  # nothing submitted


def _step_log_says(path: Path, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never said {text!r}: {path.read_text() if path.is_file() else '(absent)'}")


@pytest.mark.multihost
def test_recipe_job_distills_a_student(local_cluster, tmp_path, capsys, tiny_tokens_dir, tiny_teacher_dir):
    """The default job is `kdscale run RECIPE`: here cache → train (2 steps) → export."""
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(yaml.safe_dump({
        "recipe": {"name": "slurm", "out": str(tmp_path / "run"), "teacher": str(tiny_teacher_dir),
                   "stages": ["cache", "train", "export"]},
        "data": {"out": str(tiny_tokens_dir)},
        "cache": {"ray": {"num_cpus": 2}, "codec": {"k": 8}},
        "model": {"num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64, "vocab_size": 49152},
        "train": {"steps": 2, "global_batch": 4, "micro_batch": 2},
        "wandb": {"enabled": False},
    }))  # fmt: skip
    status, out, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--time", "10",
                             "--log-dir", str(tmp_path / "logs"))
    assert status == 0
    job_id = out.strip()
    assert job_id.isdigit()
    final = slurm.wait_job(job_id, timeout=600)
    log = (tmp_path / "logs" / f"kdscale-run-distill-{job_id}.out").read_text()
    assert (final.state, final.exit_code) == ("COMPLETED", 0), log
    node = slurm.job_nodes(job_id)[0]
    assert node in local_cluster.hosts and f"kdscale: job {job_id} on {node} (restart 0)" in log
    assert "recipe slurm: all 3 stages complete" in log
    assert (tmp_path / "run" / "student" / "checkpoints" / "step_000000002" / "train_state.json").is_file()
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


@pytest.mark.multihost
def test_failing_job_is_reported_failed_with_its_exit_code(local_cluster, tmp_path, capsys):
    recipe = _recipe(tmp_path, inputs=[str(tmp_path / "no-such-input.txt")])
    status, out, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--stage", "data",
                             "--log-dir", str(tmp_path / "logs"), "--wait", "--timeout", "300")
    job_id, summary = out.splitlines()
    assert status == 1
    assert summary.startswith("FAILED exit_code=2 ")  # `kdscale data` exits 2 on a missing input
    final = slurm.job_status(job_id)
    assert (final.state, final.exit_code, final.reason) == ("FAILED", 2, "NonZeroExitCode")
    assert "kdscale data: error:" in (tmp_path / "logs" / f"kdscale-data-recipe-{job_id}.out").read_text()


def _stand_in(tmp_path: Path) -> Path:
    step = tmp_path / "step.sh"
    step.write_text(STAND_IN_STEP)
    step.chmod(0o755)
    return step


@pytest.mark.multihost
def test_cancel_forwards_sigterm_to_the_step(local_cluster, tmp_path, capsys):
    step_log = tmp_path / "step.log"
    _, out, _ = _submit(capsys, str(_recipe(tmp_path)), "--launcher", "slurm", "--stage", "data",
                        "--python", str(_stand_in(tmp_path)), "--env", f"STEP_LOG={step_log}",
                        "--log-dir", str(tmp_path / "logs"))
    job_id = out.strip()
    _step_log_says(step_log, "start restart=0 args=-m kdscale.cli data --config")
    slurm.cancel_job(job_id)
    final = slurm.wait_job(job_id, timeout=60)
    assert final.state == "CANCELLED"
    assert "checkpoint on TERM" in _step_log_says(step_log, "checkpoint on TERM", timeout=30)


@pytest.mark.multihost
def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(local_cluster, tmp_path, capsys):
    """What SLURM does at --signal time, done now: USR1 to the batch shell only (B:)."""
    step_log = tmp_path / "step.log"
    _, out, _ = _submit(capsys, str(_recipe(tmp_path)), "--launcher", "slurm", "--stage", "data",
                        "--python", str(_stand_in(tmp_path)), "--env", f"STEP_LOG={step_log}",
                        "--time", "30", "--log-dir", str(tmp_path / "logs"))
    job_id = out.strip()
    _step_log_says(step_log, "start restart=0")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    _step_log_says(step_log, "checkpoint on TERM")
    requeued = slurm.wait_job(job_id, timeout=60, states=frozenset({"PENDING"}))
    assert requeued.restarts == 1
    # SLURM holds a requeued job back a while (BeginTime); let it start again now, though not within
    # the second of the requeue, whose revoked job credential would refuse the start.
    time.sleep(1.1)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    final = slurm.wait_job(job_id, timeout=120)
    assert (final.state, final.exit_code) == ("COMPLETED", 0)
    assert _step_log_says(step_log, "resumed").splitlines() == [
        f"start restart=0 args=-m kdscale.cli data --config {tmp_path / 'recipe.yaml'}",
        "checkpoint on TERM",
        f"start restart=1 args=-m kdscale.cli data --config {tmp_path / 'recipe.yaml'}",
        "resumed",
    ]
    log = (tmp_path / "logs" / f"kdscale-data-recipe-{job_id}.out").read_text()
    assert "kdscale: SIGUSR1" in log and f"requeueing job {job_id}" in log and "(restart 1)" in log


@pytest.mark.multihost
def test_env_secrets_reach_the_job_but_never_the_script_file(local_cluster, tmp_path, capsys):
    """`--env KEY=secret`: the job sees it; the 0600 script file holds only the name."""
    seen, secret = tmp_path / "seen", "s3cr3t-" + os.urandom(6).hex()
    step = tmp_path / "step.sh"
    step.write_text(f'#!/bin/bash\necho "$KDSCALE_TEST_TOKEN" > {seen}\n')
    step.chmod(0o755)
    logs = tmp_path / "logs"
    status, out, _ = _submit(capsys, str(_recipe(tmp_path)), "--launcher", "slurm", "--stage",
                             "data", "--python", str(step), "--log-dir", str(logs),
                             "--env", f"KDSCALE_TEST_TOKEN={secret}", "--wait", "--timeout", "120")
    assert status == 0, out
    assert seen.read_text().strip() == secret
    (script,) = logs.glob("*.sbatch")
    assert (script.stat().st_mode & 0o777) == 0o600
    assert secret not in script.read_text() and "KDSCALE_TEST_TOKEN" in script.read_text()


@pytest.mark.multihost
def test_ray_template_caches_on_a_ray_cluster_over_two_nodes(
    local_cluster, tmp_path, capsys, tiny_tokens_dir, tiny_teacher_dir, tiny_cache_dir
):
    """A Ray head on the job's first node, a worker on the second, two actors (one CPU each):
    the cache of one host and one actor (`tiny_cache_dir`), shards written on both nodes."""
    recipe = tmp_path / "cache.yaml"
    recipe.write_text(yaml.safe_dump({
        "cache": {"tokens": str(tiny_tokens_dir), "out": str(tmp_path / "cache"),
                  "teacher": {"model": str(tiny_teacher_dir)}, "ray": {"actors": 2}},
        "wandb": {"enabled": False},
    }))  # fmt: skip
    status, out, _ = _submit(capsys, str(recipe), "--launcher", "slurm", "--stage", "cache", "--nodes", "2",
                             "--log-dir", str(tmp_path / "logs"), "--wait", "--timeout", "600")
    job_id, summary = out.splitlines()
    log = (tmp_path / "logs" / f"kdscale-cache-cache-{job_id}.out").read_text()
    assert status == 0 and summary.startswith("COMPLETED exit_code=0"), log
    nodes = slurm.job_nodes(job_id)
    assert len(set(nodes)) == 2 and f"kdscale: Ray head on {nodes[0]} (" in log
    assert shard_bytes(tmp_path / "cache") == shard_bytes(tiny_cache_dir)
    assert {r.host for r in load_cache_manifest(tmp_path / "cache").shards.values()} == set(nodes)
