"""The one door into megatron's parallel state: process group, tensor × pipeline × data groups, seeds.

    with parallel_session(cfg.parallel, seed=cfg.train.seed):   # or initialize/destroy_parallel
        chunks = build_model_chunks(cfg.model, cfg.parallel)

Launched ranks (torchrun, srun, ``kdscale train`` with ``train.nproc_per_node``; RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK set) join the job's world; a bare process (a CLI command, a
Ray actor, a test) is a world of one on an in-memory store, with no port to pick. The backend is
nccl on a GPU and gloo on CPU. A process group that already exists (a test's spawned ranks) is
used as it is and left to its owner. All groups come from megatron's ``parallel_state``; nothing
here builds groups or computes ranks itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from kdscale.config import ParallelConfig

# Whether initialize_parallel created the default process group (and so destroy_parallel ends it).
_OWNS_PROCESS_GROUP = False


def initialize_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Join the default process group (from the environment, unless already joined), build
    megatron's tensor × pipeline × data groups, and seed every RNG megatron uses.

    Seeds follow megatron-LM: ``seed + 100 × pipeline rank`` for the CPU generator and the
    model-parallel RNG tracker, so pipeline stages do not build identical layers, while tensor
    ranks (and data-parallel replicas) share a seed and so the same initial weights.
    """
    global _OWNS_PROCESS_GROUP
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWNS_PROCESS_GROUP = True
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_parallel() -> None:
    """Undo :func:`initialize_parallel`: megatron's groups, and the default group if it made it."""
    global _OWNS_PROCESS_GROUP
    parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


@contextlib.contextmanager
def parallel_session(parallel: ParallelConfig, seed: int = 0) -> Iterator[None]:
    """:func:`initialize_parallel` for the duration of the block, then :func:`destroy_parallel`."""
    initialize_parallel(parallel, seed=seed)
    try:
        yield
    finally:
        destroy_parallel()


def device() -> torch.device:
    """This rank's compute device: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
