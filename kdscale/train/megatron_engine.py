"""The megatron-core engine: a TP × PP × DP student, its DDP, optimizer, schedule and checkpoints.

    check_megatron_run(cfg, world_size)                   # before any rank starts
    train(cfg, inputs, cfg.parallel, lambda: MegatronEngine(cfg, inputs))   # kdscale.train.loop

One optimizer step (:meth:`MegatronEngine.train_step`): zero the gradient buffers → megatron's
schedule runs forward and backward over this rank's micro-batches (1F1B, interleaved with
virtual stages; the loss is :func:`kdscale.train.objective.student_loss`), reduces gradients
over data-parallel ranks and divides them by the tokens of the global batch → advance the LR
schedule → clip and step Adam. The one host sync of a step is megatron's: its optimizer reads
the global gradient norm to clip it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import distrib_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from kdscale.config import KDScaleConfig
from kdscale.data.store import TokenStore
from kdscale.errors import KDScaleError
from kdscale.models import build_model_chunks, transformer_config, validate_layout
from kdscale.models.checkpoints import load_weights
from kdscale.models.parallel import device
from kdscale.train.checkpoint import Progress, load_checkpoint, save_checkpoint
from kdscale.train.checks import RunInputs, start_note
from kdscale.train.evaluate import EvalResult, chunk_needs, evaluate
from kdscale.train.loader import NOTHING, MicroBatch
from kdscale.train.loop import StepResult
from kdscale.train.metrics import reports_loss
from kdscale.train.objective import Objective
from kdscale.train.optim import build_optimizer


def check_megatron_run(cfg: KDScaleConfig, world_size: int) -> None:
    """What only the megatron engine refuses, checked before anything else of the run."""
    validate_layout(cfg.model, cfg.parallel, world_size)  # megatron's config asserts on it
    transformer_config(cfg.model, cfg.parallel)  # precision/TE problems fail here
    if cfg.train.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise KDScaleError(
            "train.use_distributed_optimizer=true needs Transformer Engine or Apex: without "
            "them megatron-core 0.16 cannot checkpoint torch Adam's state in its distributed "
            "optimizer; set train.use_distributed_optimizer=false on this machine"
        )


class MegatronEngine:
    """The megatron-core model, optimizer and schedule of one run on this rank."""

    def __init__(self, cfg: KDScaleConfig, inputs: RunInputs) -> None:
        self.cfg, self.inputs = cfg, inputs
        self.chunks = build_model_chunks(cfg.model, cfg.parallel, returns="hidden")
        verify = cfg.integrity.verify_checksums
        if inputs.resume_from is None and inputs.init_from is not None:
            load_weights(inputs.init_from, self.chunks, verify)  # before DDP copies the weights
        self.model, self.optimizer, self.scheduler = build_optimizer(
            self.chunks, cfg.train, cfg.model.precision
        )
        self.progress = Progress()
        if inputs.resume_from is not None:
            self.progress = load_checkpoint(
                inputs.resume_from, self.chunks, self.optimizer, self.scheduler, verify
            )
        init = str(inputs.init_from) if inputs.init_from is not None else None
        self.origin = start_note(cfg, inputs, init, "train.init")
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = device()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        self.objective = Objective(cfg.loss, tp_group, self.device)
        self.needs = NOTHING
        for chunk in self.model:
            self.needs |= chunk_needs(chunk, targets=inputs.cache is not None)

    def train_step(
        self, batches: list[MicroBatch], kd_weight: float | None, validate: bool
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch."""
        for model in self.model:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.objective.kd_weight, self.objective.validate = kd_weight, validate
        outputs = get_forward_backward_func()(
            forward_step_func=self.objective,
            data_iterator=[iter(batches) for _ in self.model] if len(self.model) > 1
            else iter(batches),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.inputs.tokens.seq_len,
            micro_batch_size=self.cfg.train.micro_batch,
        )
        self.scheduler.step(1)  # step k runs at the schedule's rate for k
        _, grad_norm, _ = self.optimizer.step()  # host sync: megatron reads the norm to clip
        sums = torch.stack([o["sums"] for o in outputs]).sum(0) if reports_loss() else None
        return StepResult(sums, grad_norm)

    def evaluate(self, samples: TokenStore, limit: int, kd_weight: float | None) -> EvalResult:
        """megatron's forward-only schedule over the first ``limit`` samples."""
        return evaluate(
            self.model, self.objective, samples, limit,
            micro_batch=self.cfg.train.micro_batch, seq_len=self.inputs.tokens.seq_len,
            kd_weight=kd_weight, dp_rank=self.dp_rank, dp_size=self.dp_size,
        )  # fmt: skip

    def save(self, progress: Progress) -> Path:
        """A megatron dist_checkpointing checkpoint of this step (collective)."""
        return save_checkpoint(
            self.cfg, progress, self.chunks, self.optimizer, self.scheduler,
            self.inputs.fingerprints(),
        )  # fmt: skip

    def learning_rate(self) -> float:
        """The rate of the last step."""
        return self.scheduler.get_lr(self.optimizer.param_groups[0])

    def finish(self) -> None:
        """Nothing more to do at the end of a megatron run."""
