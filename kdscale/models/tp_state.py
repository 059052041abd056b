"""Full (TP=1) state dicts ↔ a tensor-parallel GPTModel rank, for one pipeline stage.

Megatron marks each split parameter with ``partition_dim``; replicated ones (the RMSNorm
weights) carry no mark. The SwiGLU ``linear_fc1`` is the exception: each rank holds
``[gate_r; up_r]``, not a contiguous row block of ``[gate; up]``. The fused QKV weight needs
nothing special: its rows are grouped per key/value head, and each rank holds whole groups.

    full = gather_full_state(gpt)        # every rank gets the whole model (collective)
    load_full_state(gpt, full)           # each rank copies in its own slice
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_FC1 = "mlp.linear_fc1.weight"


def _params(gpt: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(gpt.named_parameters())


def _split_dim(param: torch.nn.Parameter) -> int | None:
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def gather_full_state(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state of this pipeline stage's parameters, on every TP rank (collective)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for name, param in _params(gpt).items():
        dim = _split_dim(param)
        local = param.detach()
        if dim is None or size == 1:
            out[name] = local.clone()
            continue
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        if name.endswith(_FC1):
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
            out[name] = torch.cat([*gates, *ups], dim=0)
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def load_full_state(gpt: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of the unsharded ``full`` into ``gpt`` (every parameter must exist)."""
    params = _params(gpt)
    missing = sorted(set(params) - set(full))
    unexpected = sorted(set(full) - set(params))
    assert (
        not missing and not unexpected
    ), f"state mismatch: missing {missing[:3]}, extra {unexpected[:3]}"
    load_tensors(gpt, full.__getitem__)


def load_tensors(gpt: torch.nn.Module, full_tensor: Callable[[str], torch.Tensor]) -> None:
    """Copy this rank's slice of each parameter's unsharded tensor into ``gpt``, asking
    ``full_tensor(name)`` for one at a time (a streaming import holds one tensor, not the model)."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in _params(gpt).items():
            tensor, dim = full_tensor(name), _split_dim(param)
            if dim is not None and size > 1:
                if name.endswith(_FC1):
                    gate, up = tensor.chunk(2, dim=0)
                    tensor = torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]], dim=0)
                else:
                    tensor = tensor.chunk(size, dim=dim)[rank]
            assert (
                tensor.shape == param.shape
            ), f"{name}: {tuple(tensor.shape)} vs {tuple(param.shape)}"
            param.copy_(tensor)
            del tensor
