"""Submit kdscale commands to a running Ray cluster through Ray's Jobs API.

    job_id = submit_ray_job("http://head:8265", job_command("recipe.yaml", "cache").shell(),
                            working_dir="recipes/", env={"HF_HOME": "/shared/hf"})
    status = wait_ray_job("http://head:8265", job_id)      # "SUCCEEDED" | "FAILED" | "STOPPED"
    print(ray_job_logs("http://head:8265", job_id, tail=40))

``working_dir`` is uploaded to the cluster and is the job's current directory, so a recipe in
it is named relative to it; its input and output paths should be on storage the cluster shares.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdscale.errors import KDScaleError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDScaleError(f"--address {address!r}: cannot reach the Ray dashboard ({first})") from None


def submit_ray_job(
    address: str,
    entrypoint: str,
    working_dir: str | Path | None = None,
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Submit ``entrypoint`` (a shell command) to the cluster at ``address``; return the job id."""
    runtime_env: dict[str, Any] = {}
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise KDScaleError(f"--working-dir {str(working_dir)!r}: not a directory")
        runtime_env["working_dir"] = str(Path(working_dir).resolve())
    if env:
        runtime_env["env_vars"] = dict(env)
    return _client(address).submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env or None, submission_id=submission_id
    )


def ray_job_status(address: str, job_id: str) -> str:
    """The job's status name: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address).get_job_status(job_id).value)


def wait_ray_job(address: str, job_id: str, timeout: float = 3600.0, poll: float = 0.5) -> str:
    """Poll until job ``job_id`` ends and return its final status; a one-line error on timeout."""
    client = _client(address)
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise KDScaleError(f"Ray job {job_id}: still {status} after {timeout:.0f} s")
        time.sleep(poll)


def ray_job_logs(address: str, job_id: str, tail: int | None = None) -> str:
    """What the job's entrypoint wrote to stdout and stderr so far (its last ``tail`` lines)."""
    logs = str(_client(address).get_job_logs(job_id))
    return logs if tail is None else "".join(logs.splitlines(keepends=True)[-tail:])


def ray_job_message(address: str, job_id: str) -> str:
    """The first line of Ray's account of how the job ended (e.g. the entrypoint's exit code)."""
    message = str(_client(address).get_job_info(job_id).message or "")
    return message.splitlines()[0] if message else ""
