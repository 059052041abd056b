"""Start N local ranks of a kdscale command, the way torchrun would, and forward signals to them.

    status = launch_local(["train", "--config", "runs/student/config.yaml"], nproc=4)

Each rank is ``python -m kdscale.cli <args>`` with RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and, unless set, OMP_NUM_THREADS = cores / ranks)
set, in its own session so that a terminal's
Ctrl-C reaches only this launcher. SIGTERM, SIGUSR1 and SIGINT sent to the launcher are passed
on to every rank (torchrun does not pass on SIGUSR1, which SLURM sends before preemption), so the
ranks can save and exit together. If a rank fails, the others are stopped. Multi-node runs use
torchrun (or srun) with ``python -m kdscale.cli train`` directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from kdscale.logging import get_logger

log = get_logger(__name__)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_GRACE_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local(args: list[str], nproc: int, env: dict[str, str] | None = None) -> int:
    """Run ``kdscale <args>`` on ``nproc`` local ranks (``env``: more variables for them);
    return the first failing status or 0."""
    base = dict(os.environ) | (env or {})
    # As torchrun does: ranks sharing a node do not each start one thread per core.
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kdscale.cli", *args],
            env=base | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            start_new_session=True,
        )
        for rank in range(nproc)
    ]

    def forward(signum: int, frame: FrameType | None) -> None:
        log.info("passing %s on to %d ranks", signal.Signals(signum).name, nproc)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; once one fails, stop the rest (SIGTERM, then SIGKILL)."""
    failed_at = None
    while any(p.poll() is None for p in procs):
        status = next((p.returncode for p in procs if p.returncode not in (None, 0)), None)
        if status is not None and failed_at is None:
            failed_at = time.monotonic()
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
        if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.05)
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell
