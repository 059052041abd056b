"""megatron's DistributedDataParallel, optimizer and learning-rate schedule for the student.

    ddp, optimizer, scheduler = build_optimizer(chunks, cfg.train, cfg.model.precision)

Gradients are reduced by megatron's DDP (bucketed; sharded with the distributed optimizer) and
scaled by ``1 / tokens in the global batch`` (``calculate_per_token_loss``); the optimizer clips
the global norm and steps Adam in fp32 (fp32 main weights under bf16/fp8). The schedule is
megatron's ``OptimizerParamScheduler``; the trainer advances it by one before each optimizer
step, so step k (1-based) runs at the schedule's rate for k.
"""

from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from kdscale.config.train import TrainConfig

_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "wsd": "WSD", "constant": "constant"}


def build_optimizer(
    chunks: list[GPTModel], train: TrainConfig, precision: str
) -> tuple[list[DistributedDataParallel], MegatronOptimizer, OptimizerParamScheduler]:
    """Wrap ``chunks`` in DDP; build Adam and its schedule; wire them into the schedules."""
    low_precision = precision in ("bf16", "fp8")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=low_precision,
        use_distributed_optimizer=train.use_distributed_optimizer,
    )
    ddp = []
    for chunk in chunks:
        chunk.config.calculate_per_token_loss = True  # see kdscale.train.objective
        # As megatron-LM: every parameter in bf16 (norm weights too; the optimizer keeps fp32
        # copies), inputs cast on the first stage, outputs back to fp32 on the last.
        module = Float16Module(chunk.config, chunk) if low_precision else chunk
        ddp.append(DistributedDataParallel(chunk.config, ddp_config, module))
    opt = train.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=train.lr.lr,
            min_lr=train.lr.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=low_precision,
            params_dtype=chunks[0].config.params_dtype,
            use_distributed_optimizer=train.use_distributed_optimizer,
        ),
        ddp,
    )
    config = chunks[0].config  # the schedules and finalize_model_grads read the first chunk's
    config.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, lr_scheduler(optimizer, train)


def lr_scheduler(optimizer: MegatronOptimizer, train: TrainConfig) -> OptimizerParamScheduler:
    """megatron's schedule for ``train.lr`` over ``train.steps``; on resume only its step count
    comes from the checkpoint (the configured shape wins, so a run can be extended)."""
    lr = train.lr
    decay_steps = max(train.steps, lr.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr.lr,
        min_lr=lr.min_lr,
        lr_warmup_steps=lr.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=_DECAY_STYLES[lr.decay],
        start_wd=train.optimizer.weight_decay,
        end_wd=train.optimizer.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=max(1, round(lr.wsd_decay_fraction * decay_steps)),
        lr_wsd_decay_style=lr.wsd_decay_style,
    )
