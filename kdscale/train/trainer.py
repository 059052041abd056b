"""The megatron engine: load or init → per step train, log, evaluate, save → exit cleanly.

    train(cfg, inputs)   # inputs = kdscale.train.checks.check_run(cfg, world_size)

When each of those happens is :class:`kdscale.train.loop.TrainLoop`'s (shared with the
DeepSpeed engine, :mod:`kdscale.train.zero`); this module is the megatron step.

One optimizer step: zero the gradient buffers → this rank's micro-batches (prefetched) →
megatron's schedule runs forward and backward over them (1F1B, interleaved with virtual
stages), reduces gradients over data-parallel ranks and divides them by the tokens of the
global batch → advance the LR schedule → clip and step Adam. Metrics stay on the device
between log steps; a log step reduces them over all ranks once (one host sync).

SIGTERM and SIGUSR1 (what SLURM sends before preemption) ask for a clean stop: after the
current step every rank agrees (one tiny all-reduce per step), saves a checkpoint and returns
0; running the same command resumes. ``train.exit_interval`` stops the same way on a schedule.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import distrib_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.losses import kd_weight_at
from kdscale.models import build_model_chunks, transformer_config
from kdscale.train.checkpoint import (
    Progress,
    load_checkpoint,
    load_weights,
    remove_interrupted_saves,
    save_checkpoint,
)
from kdscale.train.checks import RunInputs
from kdscale.train.distributed import destroy_parallel, device, initialize_parallel
from kdscale.train.evaluate import EvalResult, chunk_needs, evaluate
from kdscale.train.loader import NOTHING
from kdscale.train.loop import StopRequest, TrainLoop, catch_stop_signals
from kdscale.train.metrics import reports_loss
from kdscale.train.objective import Objective, use_sparse_kd_loss
from kdscale.train.optim import build_optimizer

log = get_logger(__name__)


def train(cfg: KDScaleConfig, inputs: RunInputs) -> int:
    """Run (or continue) training as configured; collective over all ranks. Returns 0."""
    transformer_config(cfg.model, cfg.parallel)  # precision/TE problems fail here, first
    if cfg.train.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise KDScaleError(
            "train.use_distributed_optimizer=true needs Transformer Engine or Apex: without "
            "them megatron-core 0.16 cannot checkpoint torch Adam's state in its distributed "
            "optimizer; set train.use_distributed_optimizer=false on this machine"
        )
    # Signals are caught first: one during set-up still ends in a clean stop.
    with catch_stop_signals() as stop:
        initialize_parallel(cfg.parallel, seed=cfg.train.seed)
        try:
            trainer = Trainer(cfg, inputs, stop)
            try:
                return trainer.fit()
            finally:
                trainer.close()
        finally:
            destroy_parallel()


class Trainer(TrainLoop):
    """The megatron-core model, optimizer, data and sinks of one run on this rank."""

    def __init__(
        self, cfg: KDScaleConfig, inputs: RunInputs, stop: StopRequest | None = None
    ) -> None:
        self.cfg, self.inputs, self.stop = cfg, inputs, stop or StopRequest()
        self.train_cfg = train = cfg.train
        self.out = Path(train.out)
        self.seq_len = inputs.tokens.seq_len
        self.rank0 = dist.get_rank() == 0
        if self.rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_interrupted_saves(self.out)
            write_resolved_config(cfg, self.out)
        self.chunks = build_model_chunks(cfg.model, cfg.parallel)
        if inputs.resume_from is None and inputs.init_from is not None:
            load_weights(inputs.init_from, self.chunks)  # before DDP copies the weights
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for chunk in self.chunks:
            use_sparse_kd_loss(chunk, cfg.loss, tp_group)
        self.model, self.optimizer, self.scheduler = build_optimizer(
            self.chunks, train, cfg.model.precision
        )
        self.progress = Progress()
        if inputs.resume_from is not None:
            self.progress = load_checkpoint(
                inputs.resume_from, self.chunks, self.optimizer, self.scheduler
            )
            log.info("resumed from %s at step %d", inputs.resume_from, self.progress.step)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.objective = Objective(kd=inputs.cache is not None, device=device())
        needs = NOTHING
        for chunk in self.model:
            needs |= chunk_needs(chunk, targets=inputs.cache is not None)
        self.open_data_and_sinks(needs)

    # --- one step ---------------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step over the next global batch."""
        start = time.perf_counter()
        for model in self.model:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.loader.next_step()
        step = self.progress.step  # 0-based index of this step
        if self.objective.kd:
            self.objective.kd_weight = kd_weight_at(self.cfg.loss, step, self.train_cfg.steps)
        outputs = get_forward_backward_func()(
            forward_step_func=self.objective,
            data_iterator=[iter(batches) for _ in self.model] if len(self.model) > 1
            else iter(batches),
            model=self.model,
            num_microbatches=self.loader.micro_batches,
            seq_length=self.seq_len,
            micro_batch_size=self.train_cfg.micro_batch,
        )
        self.scheduler.step(1)  # step k runs at the schedule's rate for k
        _, grad_norm, _ = self.optimizer.step()  # host sync (megatron reads the norm)
        self.advance()
        sums = torch.stack([o["sums"] for o in outputs]).sum(0) if reports_loss() else None
        self.record_step(sums, grad_norm, time.perf_counter() - start)

    # --- evaluation, saving -------------------------------------------------------------------

    def kd_weight(self) -> float | None:
        """α of the last step; None without a cache."""
        return self.objective.kd_weight if self.objective.kd else None

    def evaluate_samples(self, limit: int) -> EvalResult:
        """megatron's forward-only schedule over the first ``limit`` eval samples."""
        return evaluate(
            self.model,
            self.eval_store,
            limit,
            micro_batch=self.train_cfg.micro_batch,
            seq_len=self.seq_len,
            kd_weight=self.objective.kd_weight,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )

    def save(self) -> None:
        """A megatron dist_checkpointing checkpoint of this step (collective)."""
        path = save_checkpoint(
            self.cfg, self.progress, self.chunks, self.optimizer, self.scheduler,
            self.inputs.fingerprints(),
        )  # fmt: skip
        log.info("saved %s", path)
