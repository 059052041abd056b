"""`kdscale submit --launcher ray` to the Ray cluster of the local namespace hosts, and the cache
stage it runs there: actors on two worker hosts write the cache a single-host run writes.

The job's driver runs on the head host (no CPUs for actors), the two teacher actors in a
placement group spread over the worker hosts; the test process submits over the bridge, as a
login node would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers_cluster import LocalCluster
from kdscale.cache.manifest import load_cache_manifest
from kdscale.cache.reader import open_cache
from kdscale.cli import main
from kdscale.launch import ray_jobs
from helpers_cache import shard_bytes


def _recipe(tmp_path: Path, tokens: Path, teacher: Path, gcs: str) -> Path:
    """The cache section of ``make_cache`` (the single-host `tiny_cache_dir`), on ``gcs``."""
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    tree = {
        "cache": {"tokens": str(tokens), "out": str(tmp_path / "cache"), "teacher": {"model": str(teacher)},
                  "ray": {"address": gcs, "actors": 2, "cpus_per_actor": 1}},
        "wandb": {"enabled": False},
    }  # fmt: skip
    (recipe_dir / "cache.yaml").write_text(yaml.safe_dump(tree))
    return recipe_dir / "cache.yaml"


@pytest.mark.multihost
def test_cache_job_on_two_worker_hosts_matches_the_single_host_cache(
    local_cluster: LocalCluster, tmp_path, tiny_tokens_dir, tiny_teacher_dir, tiny_cache_dir, capsys
):
    recipe = _recipe(tmp_path, tiny_tokens_dir, tiny_teacher_dir, local_cluster.ray_address)
    status = main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache",
                   "--address", local_cluster.ray_dashboard, "--env", "KDSCALE_JOB_MARK=ray-test",
                   "--wait", "--timeout", "600"])  # fmt: skip
    out = capsys.readouterr().out
    job_id, *tail, summary = out.splitlines()
    assert status == 0, out
    assert summary.startswith("SUCCEEDED")
    assert ray_jobs.ray_job_status(local_cluster.ray_dashboard, job_id) == "SUCCEEDED"
    assert "shards committed" in "\n".join(tail)
    logs = ray_jobs.ray_job_logs(local_cluster.ray_dashboard, job_id)
    assert "\n".join(tail) in logs and len(tail) <= 40  # the log's tail
    port = local_cluster.ray_address.rsplit(":", 1)[1]
    assert re.search(rf"Connecting to existing Ray cluster at address: [\w.]+:{port}\.\.\.", logs), logs

    cache = tmp_path / "cache"
    assert shard_bytes(cache) == shard_bytes(tiny_cache_dir)  # byte-identical to one host, one actor
    hosts = {record.host for record in load_cache_manifest(cache).shards.values()}
    assert hosts == set(local_cluster.hosts[1:])  # both worker hosts wrote shards; the head none
    keys = [key for split in ("train", "eval") for key, _, _ in open_cache(cache).iter_split(split)]
    assert len(keys) == len(set(keys)) == sum(s.samples for s in load_cache_manifest(cache).shards.values())

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(local_cluster.ray_dashboard).get_job_info(job_id)
    assert info.runtime_env["env_vars"] == {"KDSCALE_JOB_MARK": "ray-test"}
    assert info.entrypoint == "python -m kdscale.cli cache --config cache.yaml"


@pytest.mark.multihost
def test_failing_ray_job_is_reported_failed_with_the_log_tail(local_cluster, tmp_path, tiny_teacher_dir, capsys):
    recipe = _recipe(tmp_path, tmp_path / "no-tokens", tiny_teacher_dir, local_cluster.ray_address)
    status = main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache",
                   "--address", local_cluster.ray_dashboard, "--wait", "--timeout", "300"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 1
    assert out.splitlines()[-1].startswith("FAILED") and "exit code 2" in out.splitlines()[-1]
    assert "kdscale cache: error:" in out


@pytest.mark.multihost
def test_a_dead_dashboard_address_is_a_one_line_error(local_cluster, tmp_path, tiny_teacher_dir, capsys):
    recipe = _recipe(tmp_path, tmp_path, tiny_teacher_dir, local_cluster.ray_address)
    dead = "http://10.77.0.99:8275"  # on the cluster's subnet, no host there
    assert main(["submit", str(recipe), "--launcher", "ray", "--stage", "cache", "--address", dead]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--address {dead!r}: cannot reach the Ray dashboard" in err


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
