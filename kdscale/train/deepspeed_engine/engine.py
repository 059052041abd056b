"""The DeepSpeed ZeRO engine: a transformers student under ``deepspeed.initialize``, driven by the
shared loop (:mod:`kdscale.train.loop`).

    cfg, inputs, start = check_deepspeed_run(cfg, world_size)
    train(cfg, inputs, ParallelConfig(), lambda: DeepSpeedEngine(cfg, inputs, start))

One optimizer step (:meth:`DeepSpeedEngine.train_step`): count the global batch's tokens (one
small all-reduce: a host sync, since the count scales the loss) → per micro-batch, forward, loss
sum × (data-parallel size / global tokens) (DeepSpeed averages gradients over ranks, so the
step's gradient is d(sum of token losses)/tokens, as in the megatron engine) and
``engine.backward`` → advance the LR schedule → DeepSpeed reduces, clips and steps AdamW at the
accumulation boundary. At ``train.steps`` the model is exported to ``out/hf``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from kdscale.config import KDScaleConfig
from kdscale.data.store import TokenStore
from kdscale.progress import track
from kdscale.train.checkpoint import Progress
from kdscale.train.checks import RunInputs, start_note
from kdscale.train.deepspeed_engine.checkpoint import load_zero_checkpoint, save_zero_checkpoint
from kdscale.train.deepspeed_engine.export import HF_EXPORT, export_hf_dir
from kdscale.train.deepspeed_engine.objective import CausalLMWithLoss, micro_batch_loss
from kdscale.train.deepspeed_engine.setup import build_engine
from kdscale.train.deepspeed_engine.start import Start, build_student
from kdscale.train.evaluate import EvalResult
from kdscale.train.loader import MicroBatch, Needs, batch_to_device, eval_batches
from kdscale.train.loop import StepResult
from kdscale.train.loss_sums import SUMS
from kdscale.train.metrics import sum_to_all


class DeepSpeedEngine:
    """The DeepSpeed engine, optimizer and schedule of one run on this rank."""

    def __init__(self, cfg: KDScaleConfig, inputs: RunInputs, start: Start) -> None:
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.inputs, self.start = cfg, inputs, start
        resuming = inputs.resume_from is not None
        model = build_student(
            start, seed=cfg.train.seed, load_weights=not resuming,
            verify=cfg.integrity.verify_checksums,
        )  # fmt: skip
        self.ds, self.optimizer, self.scheduler = build_engine(
            CausalLMWithLoss(model, cfg.loss), cfg.train, cfg.model.precision
        )
        self.device = torch.device(get_accelerator().current_device_name())
        self.progress = Progress()
        if resuming:
            self.progress = load_zero_checkpoint(
                inputs.resume_from, self.ds, self.scheduler, cfg.integrity.verify_checksums
            )
        weights = None if start.kind == "random" else str(start.path)
        self.origin = start_note(cfg, inputs, weights, "train.deepspeed.model")
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.needs = Needs(tokens=True, targets=inputs.cache is not None)

    def train_step(
        self, batches: list[MicroBatch], kd_weight: float | None, validate: bool
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches of the global batch."""
        local = sum(b.mask.sum().item() if b.mask is not None else b.tokens[:, 1:].numel()
                    for b in batches)  # fmt: skip  (host tensors: no device sync)
        tokens = sum_to_all(torch.tensor([float(local)])).item()  # host sync: the count scales
        scale = self.dp_size / tokens  # DeepSpeed divides the reduced gradients by dp_size
        self.scheduler.step(1)  # step k runs at the schedule's rate for k
        sums = torch.zeros(len(SUMS), device=self.device)
        for batch in batches:
            total, _, batch_sums = micro_batch_loss(
                self.ds, batch_to_device(batch, self.device), kd_weight, validate
            )
            self.ds.backward(total * scale, scale_wrt_gas=False)
            self.ds.step()  # reduces, clips and steps only at the accumulation boundary
            sums += batch_sums
        return StepResult(sums, self.ds.get_global_grad_norm())

    def evaluate(self, samples: TokenStore, limit: int, kd_weight: float | None) -> EvalResult:
        """Forward passes over the first ``limit`` samples, split over ranks."""
        train = self.cfg.train
        count, batches = eval_batches(
            samples, limit, micro_batch=train.micro_batch, dp_rank=self.dp_rank,
            dp_size=self.dp_size, needs=Needs(tokens=True, targets=kd_weight is not None),
        )  # fmt: skip
        sums = torch.zeros(len(SUMS), device=self.device)
        self.ds.eval()
        try:
            with torch.no_grad():
                for batch in track(batches, "evaluating", total=count, unit="batch", leave=False,
                                   tokens_of=lambda b: b.tokens[:, 1:].numel()):  # fmt: skip
                    batch = batch_to_device(batch, self.device)
                    sums += micro_batch_loss(self.ds, batch, kd_weight, False)[2]
        finally:
            self.ds.train()
        return EvalResult.from_sums(sum_to_all(sums.double()), kd_weight is not None)

    def save(self, progress: Progress) -> Path:
        """A DeepSpeed checkpoint of this step in kdscale's layout (collective)."""
        return save_zero_checkpoint(
            self.cfg, progress, self.ds, self.scheduler, self.inputs.fingerprints()
        )

    def learning_rate(self) -> float:
        """The rate of the last step."""
        return self.scheduler.get_lr(self.optimizer.param_groups[0])

    def finish(self) -> None:
        """Export the trained model to ``out/hf`` (``train.deepspeed.export_hf``; collective)."""
        if self.cfg.train.deepspeed.export_hf:
            export_hf_dir(self.ds, Path(self.cfg.train.out) / HF_EXPORT, self.start.tokenizer)
