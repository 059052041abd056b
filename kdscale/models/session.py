"""Enter megatron's parallel state from anywhere: a launched job, a test rank, or a bare process.

    with parallel_session(ParallelConfig(tensor=2), seed=0):
        gpt = build_gpt_model(...)

Under torchrun (``RANK`` set) or inside an existing process group the job's ranks are used; a
bare process gets a one-rank gloo group on a private file store (no port to pick).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch.distributed as dist

from kdscale.config import ParallelConfig
from kdscale.train.distributed import destroy_parallel, initialize_parallel


@contextlib.contextmanager
def parallel_session(parallel: ParallelConfig, seed: int = 0) -> Iterator[None]:
    """megatron's groups for ``parallel`` for the duration of the block (then torn down)."""
    own = not dist.is_initialized() and "RANK" not in os.environ
    with tempfile.TemporaryDirectory(prefix="kdscale-pg-") as tmp:
        if own:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            initialize_parallel(parallel, seed=seed)
            try:
                yield
            finally:
                destroy_parallel()
        finally:
            if own:
                dist.destroy_process_group()
