"""Run a function on N spawned processes joined by a gloo process group (real torch.distributed).

    results = run_distributed(_worker, world_size=2, args=(cfg,))

``_worker(rank, world_size, *args)`` must be a module-level function; whatever it returns on each
rank comes back in a list indexed by rank (anything ``torch.save`` can write).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = ()) -> list[Any]:
    """Spawn ``world_size`` ranks running ``fn(rank, world_size, *args)``; return their results."""
    with tempfile.TemporaryDirectory(prefix="kdscale-dist-") as out_dir:
        mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
