"""Make megatron-core 0.16.1 run on CPU-only torch with the gloo backend.

megatron-core is written for CUDA. On a CPU-only torch build it fails at these points
(README, "megatron-core on CPU"; each raises "Torch not compiled with CUDA
enabled" unless noted):

1. the RNG tracker (``model_parallel_cuda_manual_seed``, dropout under ``fork()``) reads and
   writes the CUDA generator;
2. about 40 ``device=torch.cuda.current_device()`` allocations (forward pass, grad buffers);
3. ``device="cuda"`` literals (schedules, causal mask, optimizer, clip_grads, dist_checkpointing);
4. ``torch.cuda.synchronize()`` in p2p communication and parallel_state;
5. ``weight.data.cuda()`` for tied embeddings under pipeline parallelism;
6. ``param.type() == 'torch.cuda.FloatTensor'`` checks: an assert in ``clip_grads`` (clip_grad
   > 0) and a TypeError in ``DistributedOptimizer`` / ``Float16OptimizerWithFloat16Params``.

:func:`patch_megatron_for_cpu` fixes all of them. ``import kdscale.models`` applies it once,
only when ``torch.cuda.is_available()`` is False; nothing else in kdscale knows about it.

Design rule: the process-wide parts only change calls that would otherwise *raise* on a
CPU-only torch (asking for the current CUDA device, synchronizing CUDA, allocating on
"cuda"), so code that worked before behaves the same. The one change of a working call,
``Tensor.type()`` reporting ``torch.cuda.*`` names, applies only to calls made from megatron's
own code. Every patch acts on a module or class in place, so it reaches code that imported
megatron names before ``kdscale.models`` was imported.

The device rewrite is a ``TorchFunctionMode``; torch keeps such modes per thread, so it is
active in the thread that imported ``kdscale.models`` (the main thread of every kdscale
entry point, of each spawned rank and of each Ray actor). Run megatron on CPU from there.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TO = torch.Tensor.to
_TENSOR_TYPE = torch.Tensor.type

# The process-wide device mode once applied (None before): kept so that applying twice is a no-op.
_ACTIVE_MODE: CudaAsCpuMode | None = None


# --- 1. RNG: the CPU generator plays the role of the "current CUDA device" generator. ------------


def _get_rng_state(
    device: Any = "cuda", clone: bool = False, graph_safe: bool = False
) -> torch.Tensor:
    # torch.get_rng_state() already returns a copy, so ``clone`` needs no extra work.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _tracker_add(self: Any, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` on the CPU generator (same duplicate checks as megatron)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    outer = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(outer)


@contextlib.contextmanager
def _tracker_fork(
    self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
) -> Iterator[None]:
    """``CudaRNGStatesTracker.fork`` on the CPU generator.

    megatron's version also warns when the CPU generator moves inside the fork (a sign of a
    CPU op in a CUDA region); on CPU that is every dropout, so this version has no warning.
    Nested forks of different names keep their states, as in megatron.
    """
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    outer_name = self._current_state_name
    outer_state = torch.get_rng_state()
    if outer_name != "default-rng":
        self.states_[outer_name] = outer_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        if outer_name != "default-rng":
            outer_state = self.states_[outer_name]
        torch.set_rng_state(outer_state)
        self._current_state_name = outer_name


def _patch_rng() -> None:
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    mrandom.CudaRNGStatesTracker.fork = _tracker_fork
    # Used (only inside this module) by activation recompute (CheckpointFunction) and the
    # state getters to save and restore the "CUDA" RNG state.
    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state


# --- 2., 4.: CUDA runtime calls that have a CPU meaning. ------------------------------------------


def _current_device() -> torch.device:
    # megatron passes this as ``device=`` to allocations (and as ``device_ids`` to barriers).
    return _CPU


def _synchronize(device: Any = None) -> None:
    # CPU ops are synchronous; there is nothing to wait for.
    return None


def _patch_cuda_runtime() -> None:
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize


# --- 3., 5., 6.: "cuda" device requests and CUDA type names, rewritten per torch call. ----------


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and (device == "cuda" or device.startswith("cuda:"))


class CudaAsCpuMode(TorchFunctionMode):
    """Treat the CPU as megatron's "current CUDA device".

    ``device="cuda"`` (or ``torch.device("cuda")``) in any torch call becomes the CPU,
    ``tensor.to("cuda")`` stays on the CPU and ``tensor.cuda()`` returns the tensor itself
    (it is already on "the device"); each of these would raise without the mode.
    ``tensor.type()`` called from megatron code reports ``torch.cuda.FloatTensor`` (etc.):
    megatron's optimizers and clip_grads sort parameters into fp32 / 16-bit groups by these
    names and reject any other (an assert in clip_grads, a TypeError in the optimizers).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            name = func(*args)
            # Frame 1 is the code that called tensor.type() (the dispatch in between is C++).
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name.removeprefix("torch.")
            return name
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if func is _TENSOR_TO:
            args = tuple(_CPU if _is_cuda_device(arg) else arg for arg in args)
        return func(*args, **kwargs)


def patch_megatron_for_cpu() -> bool:
    """Apply every CPU fix once; return True if this call applied them, False if already done.

    Call only when CUDA is unavailable (``import kdscale.models`` does exactly that).
    """
    global _ACTIVE_MODE
    assert not torch.cuda.is_available(), "the CPU shim must not be applied where CUDA exists"
    if _ACTIVE_MODE is not None:
        return False
    _patch_rng()
    _patch_cuda_runtime()
    mode = CudaAsCpuMode()
    mode.__enter__()  # stays active for the life of the thread (see the module docstring)
    _ACTIVE_MODE = mode
    return True


def is_patched() -> bool:
    """Whether :func:`patch_megatron_for_cpu` has run in this process."""
    return _ACTIVE_MODE is not None
