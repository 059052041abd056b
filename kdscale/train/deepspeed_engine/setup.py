"""The DeepSpeed engine of a run: its config, a torch AdamW and megatron's LR schedule.

    engine, optimizer, scheduler = build_engine(model, cfg.train, cfg.model.precision)

Adam is a client ``torch.optim.AdamW`` (DeepSpeed's own optimizers JIT-compile C++ ops, 40–80 s
on CPU) with megatron's parameter groups: no weight decay on 1-D parameters (norms) and
biases. Its rate comes from the same ``OptimizerParamScheduler`` as the megatron engine
(:func:`kdscale.train.optim.lr_scheduler`), advanced by the trainer once per step, and the
gradient clipping is DeepSpeed's global-norm clip at ``train.optimizer.clip_grad``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from kdscale.config.train import TrainConfig
from kdscale.train.optim import lr_scheduler

# Large enough that DeepSpeed never prints its own step summaries (kdscale logs the metrics).
_QUIET = 2**31 - 1


def skip_jit_ops_on_cpu() -> None:
    """On CPU, keep DeepSpeed from compiling its shared-memory all-reduce op (about 40 s of
    g++ on first use; gloo does the communication)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_config(train: TrainConfig, precision: str, data_parallel: int) -> dict[str, Any]:
    """The DeepSpeed config dict of a run (batch split, ZeRO stage, precision, clipping)."""
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // (train.micro_batch * data_parallel),
        "gradient_clipping": train.optimizer.clip_grad,
        "zero_optimization": {"stage": train.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }


def adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """torch AdamW over ``model`` in megatron's two groups (``wd_mult`` 1 and 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() == 1 or name.endswith(".bias") else decay).append(param)
    opt = train.optimizer
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.lr.lr,
        betas=(opt.adam_beta1, opt.adam_beta2),
        eps=opt.adam_eps,
        weight_decay=opt.weight_decay,
    )


def build_engine(
    model: torch.nn.Module, train: TrainConfig, precision: str
) -> tuple[Any, Any, Any]:
    """``deepspeed.initialize`` over the joined process group; returns ``(engine, the torch
    optimizer, its OptimizerParamScheduler)``. Collective."""
    import deepspeed
    import torch.distributed as dist

    skip_jit_ops_on_cpu()
    if dist.get_world_size() == 1:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it; a world of one is 0
    optimizer = adamw(model, train)
    scheduler = lr_scheduler(optimizer, train)  # sets each group's lr and weight decay
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(train, precision, dist.get_world_size()),
    )
    return engine, optimizer, scheduler
