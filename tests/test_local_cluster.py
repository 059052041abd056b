"""tools/local_cluster.sh: namespace hosts that behave as separate machines on a private network,
and a `down` that leaves nothing behind (also after an interrupted `up`).

The `down` test runs last in the session (conftest orders it), after every test that uses the
cluster; the session fixture's own `down` then finds nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from helpers_cluster import SCRIPT, STATE, LocalCluster, cluster_env

pytestmark = pytest.mark.multihost


def test_hosts_are_separate_machines_on_a_private_network(local_cluster: LocalCluster, tmp_path: Path) -> None:
    probe = (
        "hostname; hostname --ip-address; echo routes $(ip route | wc -l) default $(ip route | grep -c default); "
        "echo mine > /tmp/kdscale-probe; cat \"$0\"; "
        "\"$1\" -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=5)' 2>&1 | tail -1"
    )
    (tmp_path / "shared.txt").write_text("on the shared disk\n")
    for i, host in enumerate(local_cluster.hosts):
        proc = local_cluster.run_on(host, "sh", "-c", probe, str(tmp_path / "shared.txt"), sys.executable, timeout=60)
        lines = proc.stdout.splitlines()
        assert lines[:2] == [host, f"10.77.0.{i + 1}"], proc.stdout + proc.stderr
        assert lines[2] == "routes 1 default 0"  # the subnet only
        assert lines[3] == "on the shared disk"
        assert "Network is unreachable" in lines[4]
    assert not Path("/tmp/kdscale-probe").exists()  # each host has a /tmp of its own
    env = os.environ | {"SLURM_CONF": local_cluster.slurm_conf}
    srun = subprocess.run(["srun", f"--nodes={len(local_cluster.hosts)}", "hostname"], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)  # fmt: skip
    assert sorted(srun.stdout.split()) == list(local_cluster.hosts), srun.stderr
    with urllib.request.urlopen(f"{local_cluster.ray_dashboard}/nodes?view=summary", timeout=10) as reply:
        nodes = json.load(reply)["data"]["summary"]
    alive = sorted(n["raylet"]["nodeManagerHostname"] for n in nodes if n["raylet"]["state"] == "ALIVE")
    assert alive == list(local_cluster.hosts)


def test_folders_under_tmp_can_be_shared_with_every_host(
    local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo cloned under /tmp, or a folder in KDSCALE_CLUSTER_SHARED, is seen at the same path."""
    shared = Path(tempfile.mkdtemp(prefix="kdscale-shared-", dir="/tmp"))
    try:
        (shared / "probe.txt").write_text("shared under /tmp\n")
        unshared = local_cluster.run_on(local_cluster.head, "cat", str(shared / "probe.txt"), timeout=60)
        assert unshared.returncode != 0  # the host's own /tmp
        monkeypatch.setenv("KDSCALE_CLUSTER_SHARED", f"/var/nothing-here:{shared}")
        for host in local_cluster.hosts:
            proc = local_cluster.run_on(host, "cat", str(shared / "probe.txt"), timeout=60)
            assert proc.stdout == "shared under /tmp\n", proc.stderr
    finally:
        shutil.rmtree(shared)


def _leftovers() -> list[str]:
    """Namespaces, links, mounts, files and processes of the local cluster that still exist."""
    found = [f"netns {line.split()[0]}" for line in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()
        if line.startswith("kdscale")]  # fmt: skip
    found += [f"link {line.split(':')[1].strip()}" for line in subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout.splitlines()
        if ": kdscale" in line]  # fmt: skip
    found += [f"mount {line}" for line in Path("/proc/mounts").read_text().splitlines() if str(STATE) in line]
    found += [f"file {STATE}"] if STATE.exists() else []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(STATE) in cmdline or "10.77.0." in cmdline:  # daemons name their conf or address
            found.append(f"process {proc.name}: {cmdline[:120]}")
    return found


def _dead(pids: list[int]) -> bool:
    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie: PID 1 reaps it late
        except OSError:
            return True

    return all(gone(pid) for pid in pids)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_down_leaves_no_namespace_link_or_process(local_cluster: LocalCluster, tmp_path: Path) -> None:
    """With a job running on every host and a process started on one, then after an `up` that was
    killed halfway: `down` leaves no namespace, link, mount, state file or process."""
    env = os.environ | {"SLURM_CONF": local_cluster.slurm_conf}
    job = subprocess.run(["sbatch", "--parsable", f"--nodes={len(local_cluster.hosts)}", "--wrap", "srun sleep 600"],
                         capture_output=True, text=True, env=env, check=True, cwd=tmp_path).stdout.strip()  # fmt: skip
    squeue = ["squeue", "-h", "-j", job, "-o", "%T"]
    _wait_for(lambda: subprocess.run(squeue, capture_output=True, text=True, env=env).stdout.strip() == "RUNNING",
              60, "the job to run")  # fmt: skip
    stray = subprocess.Popen(local_cluster.command_on(local_cluster.hosts[1], "sleep", "600"))
    _wait_for(lambda: any(p != stray.pid for p in local_cluster.pids_on(local_cluster.hosts[1])), 30, "sleep")
    pids = [pid for host in local_cluster.hosts for pid in local_cluster.pids_on(host)]
    pids.append(int((STATE / "munge" / "munged.pid").read_text()))
    assert len(pids) > 3 * len(local_cluster.hosts)  # daemons, job steps, Ray processes
    LocalCluster.down()
    stray.wait(timeout=30)
    assert _leftovers() == []
    _wait_for(lambda: _dead(pids), 30, "every process of the cluster to exit")

    # An `up` interrupted once it has started daemons (the script and its children killed, as
    # Ctrl-C would), then `down`.
    up = subprocess.Popen([str(SCRIPT), "up", "--hosts", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=cluster_env(), start_new_session=True)  # fmt: skip
    _wait_for(lambda: (STATE / "ray" / "kdscale0.pid").is_file(), 120, "up to start daemons")
    os.killpg(up.pid, signal.SIGKILL)
    up.wait()
    assert _leftovers() != []
    LocalCluster.down()
    assert _leftovers() == []
