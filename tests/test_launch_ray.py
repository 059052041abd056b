"""`kdscale submit --launcher ray` against a real local Ray head (Jobs API on 127.0.0.1).

The head is started by the test (``ray start --head --block`` in its own process group, a temp
dir under the test's tmp) and stopped by signalling that group, so Ray instances of other
processes on the machine are left alone (``ray stop`` would end them too).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdscale.cli import main
from kdscale.launch import ray_jobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A 2-CPU Ray head with the dashboard (Jobs API); yields its GCS and dashboard addresses."""
    from ray.job_submission import JobSubmissionClient

    port, dash = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray")
    venv_bin = str(Path(sys.executable).parent)
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(
        [f"{venv_bin}/ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (temp / "head.log").read_text()
            try:
                JobSubmissionClient(address).get_version()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": address}
    finally:
        # SIGTERM lets raylet and gcs_server exit cleanly; `ray start --block` itself may linger.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        log.close()


def _recipe(tmp_path: Path, tokens: Path, teacher: Path, gcs: str) -> Path:
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    tree = {
        "cache": {"tokens": str(tokens), "out": str(tmp_path / "cache"), "batch_size": 4,
                  "teacher": {"model": str(teacher)}, "codec": {"kind": "topk", "k": 8},
                  "ray": {"address": gcs, "actors": 1, "cpus_per_actor": 1}},
        "wandb": {"enabled": False},
    }
    (recipe_dir / "cache.yaml").write_text(yaml.safe_dump(tree))
    return recipe_dir / "cache.yaml"


def test_cache_stage_runs_as_a_ray_job_attached_to_the_cluster(
    ray_head, tmp_path, tiny_tokens_dir, tiny_teacher_dir, capsys
):
    recipe = _recipe(tmp_path, tiny_tokens_dir, tiny_teacher_dir, ray_head["gcs"])
    status = main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache",
                   "--address", ray_head["dashboard"], "--env", "KDSCALE_JOB_MARK=ray-test",
                   "--wait", "--timeout", "600"])
    out = capsys.readouterr().out
    job_id, *_, summary = out.splitlines()
    assert status == 0, out
    assert summary.startswith("SUCCEEDED")
    assert ray_jobs.ray_job_status(ray_head["dashboard"], job_id) == "SUCCEEDED"
    manifest = yaml.safe_load((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2  # every train and eval shard committed
    logs = ray_jobs.ray_job_logs(ray_head["dashboard"], job_id)
    assert "shards committed" in logs and logs in out
    # The stage attached to the job's cluster (one session dir), it did not start its own Ray.
    port = ray_head["gcs"].rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: [\w.]+:{port}\.\.\.", logs), logs
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head["dashboard"]).get_job_info(job_id)
    assert info.runtime_env["env_vars"] == {"KDSCALE_JOB_MARK": "ray-test"}
    assert info.entrypoint == "python -m kdscale.cli cache --config cache.yaml"


def test_failing_ray_job_is_reported_failed(ray_head, tmp_path, tiny_teacher_dir, capsys):
    recipe = _recipe(tmp_path, tmp_path / "no-tokens", tiny_teacher_dir, ray_head["gcs"])
    status = main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache",
                   "--address", ray_head["dashboard"], "--wait", "--timeout", "300"])
    out = capsys.readouterr().out
    assert status == 1
    assert out.splitlines()[-1].startswith("FAILED") and "exit code 2" in out.splitlines()[-1]
    assert "kdscale cache: error:" in out


def test_ray_jobs_refuse_relative_outputs(tmp_path, tiny_teacher_dir, capsys):
    recipe = _recipe(tmp_path, tmp_path, tiny_teacher_dir, "auto")
    status = main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache",
                   "--address", "http://127.0.0.1:1", "--set", "cache.out=runs/cache"])
    err = capsys.readouterr().err
    assert status == 2 and "cache.out=runs/cache: a Ray job runs in a temporary copy" in err


def test_ray_launcher_needs_an_address(tmp_path, tiny_teacher_dir, capsys):
    recipe = _recipe(tmp_path, tmp_path, tiny_teacher_dir, "auto")
    assert main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache"]) == 2
    assert capsys.readouterr().err == (
        "kdscale submit: error: --launcher ray needs --address (the Ray dashboard, e.g. http://head:8265)\n"
    )
