"""The local multi-host cluster of ``tools/local_cluster.sh`` as the tests use it.

    cluster = LocalCluster.up(hosts=3)             # network-namespace hosts with Slurm and Ray
    cluster.run_on("kdscale0", "hostname")         # like `ssh kdscale0 hostname`
    cluster.kill_host("kdscale2")                  # a machine lost at once
    cluster.restore()                              # `up` again: the lost host comes back
    cluster.down()

The test process is the cluster's login node (10.77.0.254 on its bridge): it submits with
``SLURM_CONF`` and talks to the Ray dashboard over the bridge; Ray drivers run on a host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "local_cluster.sh"
STATE = Path("/run/kdscale-cluster")  # the script's state directory (KDSCALE_CLUSTER_DIR)


def cluster_env() -> dict[str, str]:
    """The environment for the script: its hosts run this interpreter's Ray."""
    return os.environ | {"KDSCALE_CLUSTER_BIN": str(Path(sys.executable).parent)}


def _script(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=cluster_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"local_cluster.sh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster: its hosts and the addresses ``up`` printed."""

    hosts: tuple[str, ...]
    slurm_conf: str
    ray_address: str
    ray_dashboard: str

    @classmethod
    def up(cls, hosts: int = 3) -> "LocalCluster":
        """``tools/local_cluster.sh up --hosts N`` (idempotent: repairs what is missing)."""
        lines = dict(line.split("=", 1) for line in _script("up", "--hosts", str(hosts)).splitlines() if "=" in line)
        return cls(tuple(lines["HOSTS"].split(",")), lines["SLURM_CONF"], lines["RAY_ADDRESS"], lines["RAY_DASHBOARD"])

    @property
    def head(self) -> str:
        return self.hosts[0]

    def restore(self) -> None:
        """Bring every host back after :meth:`kill_host`."""
        LocalCluster.up(len(self.hosts))

    @staticmethod
    def down() -> None:
        """Stop everything, remove every namespace and link (also after a broken ``up``)."""
        _script("down")

    @staticmethod
    def keep_logs(into: Path) -> None:
        """Copy the daemons' logs (Slurm, Ray's `ray start` output) into ``into`` before ``down``."""
        for logs in (STATE / "slurm" / "log", STATE / "ray"):
            if logs.is_dir():
                shutil.copytree(logs, into / logs.parent.name / logs.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.pid"))

    def command_on(self, host: str, *cmd: str) -> list[str]:
        """The argv that runs ``cmd`` on ``host`` (with this process's environment)."""
        return [str(SCRIPT), "exec", host, *cmd]

    def run_on(self, host: str, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command_on(host, *cmd), capture_output=True, text=True, timeout=timeout)

    def kill_host(self, host: str) -> None:
        """Lose ``host``: its link goes down and every process on it gets SIGKILL."""
        _script("kill", host)

    def pids_on(self, host: str) -> list[int]:
        """The processes running on ``host`` (in its network namespace)."""
        out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True, check=True).stdout
        return [int(pid) for pid in out.split()]
