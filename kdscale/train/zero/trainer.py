"""The DeepSpeed ZeRO run: the shared loop (:class:`kdscale.train.loop.TrainLoop`) around a
DeepSpeed engine.

    cfg, inputs, start = check_zero_run(cfg, world_size)
    train_zero(cfg, inputs, start)

One optimizer step: this rank's micro-batches (the shared global order) → count the global
batch's tokens (one small all-reduce) → per micro-batch, forward, loss sum × (data-parallel
size / global tokens) (DeepSpeed averages gradients over ranks, so the step's gradient is
d(sum of token losses)/tokens, as in the megatron engine) and ``engine.backward`` → advance
the LR schedule → DeepSpeed reduces, clips and steps AdamW at the accumulation boundary.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from kdscale.config import KDScaleConfig, ParallelConfig, write_resolved_config
from kdscale.logging import get_logger
from kdscale.losses import kd_weight_at
from kdscale.train.checkpoint import Progress, remove_interrupted_saves
from kdscale.train.checks import RunInputs
from kdscale.train.distributed import destroy_parallel, initialize_parallel
from kdscale.train.evaluate import EvalResult
from kdscale.train.loader import Needs, eval_batches
from kdscale.train.loop import StopRequest, TrainLoop, catch_stop_signals
from kdscale.train.loss_sums import SUMS
from kdscale.train.metrics import sum_to_all
from kdscale.train.objective import batch_to_device
from kdscale.train.zero.checkpoint import load_zero_checkpoint, save_zero_checkpoint
from kdscale.train.zero.engine import build_engine
from kdscale.train.zero.export import HF_EXPORT, export_hf_dir
from kdscale.train.zero.objective import SBVCausalLM, micro_batch_loss
from kdscale.train.zero.start import Start, build_student

log = get_logger(__name__)


def train_zero(cfg: KDScaleConfig, inputs: RunInputs, start: Start) -> int:
    """Run (or continue) a DeepSpeed run; export ``out/hf`` once at ``train.steps``.
    Collective over all ranks. Returns 0."""
    with catch_stop_signals() as stop:
        # The process group (gloo on CPU), and megatron's TP=1 groups for model-dir imports.
        initialize_parallel(ParallelConfig(), seed=cfg.train.seed)
        try:
            trainer = ZeroTrainer(cfg, inputs, start, stop)
            try:
                status = trainer.fit()
                if trainer.progress.step >= cfg.train.steps and cfg.train.deepspeed.export_hf:
                    trainer.export()
                return status
            finally:
                trainer.close()
        finally:
            destroy_parallel()


class ZeroTrainer(TrainLoop):
    """The DeepSpeed engine, data and sinks of one run on this rank."""

    def __init__(
        self, cfg: KDScaleConfig, inputs: RunInputs, start: Start, stop: StopRequest | None = None
    ) -> None:
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.inputs, self.start, self.stop = cfg, inputs, start, stop or StopRequest()
        self.train_cfg = train = cfg.train
        self.out = Path(train.out)
        self.seq_len = inputs.tokens.seq_len
        if dist.get_rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_interrupted_saves(self.out)
            write_resolved_config(cfg, self.out)
        resuming = inputs.resume_from is not None
        model = build_student(start, seed=train.seed, load_weights=not resuming)
        self.engine, self.optimizer, self.scheduler = build_engine(
            SBVCausalLM(model), train, cfg.model.precision
        )
        self.device = torch.device(get_accelerator().current_device_name())
        self.progress = Progress()
        if resuming:
            self.progress = load_zero_checkpoint(inputs.resume_from, self.engine, self.scheduler)
            log.info("resumed from %s at step %d", inputs.resume_from, self.progress.step)
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.kd = inputs.cache is not None
        self.alpha = cfg.loss.kd_weight
        self.open_data_and_sinks(Needs(tokens=True, targets=self.kd))

    def kd_weight(self) -> float | None:
        """α of the last step; None without a cache."""
        return self.alpha if self.kd else None

    def train_step(self) -> None:
        """One optimizer step over the next global batch."""
        start = time.perf_counter()
        batches = self.loader.next_step()
        if self.kd:
            self.alpha = kd_weight_at(self.cfg.loss, self.progress.step, self.train_cfg.steps)
        local = sum(b.mask.sum().item() if b.mask is not None else b.tokens[:, 1:].numel()
                    for b in batches)  # fmt: skip
        tokens = sum_to_all(torch.tensor([float(local)])).item()  # host sync
        scale = self.dp_size / tokens  # DeepSpeed divides the reduced gradients by dp_size
        self.scheduler.step(1)  # step k runs at the schedule's rate for k
        sums = torch.zeros(len(SUMS), device=self.device)
        for batch in batches:
            total, _, batch_sums = micro_batch_loss(
                self.engine, batch_to_device(batch, self.device), self.cfg.loss, self.kd_weight()
            )
            self.engine.backward(total * scale, scale_wrt_gas=False)
            self.engine.step()  # reduces, clips and steps only at the accumulation boundary
            sums += batch_sums
        grad_norm = self.engine.get_global_grad_norm()
        self.advance()
        self.record_step(sums, None if grad_norm is None else float(grad_norm),
                         time.perf_counter() - start)  # fmt: skip

    def evaluate_samples(self, limit: int) -> EvalResult:
        """Forward passes over the first ``limit`` eval samples, split over ranks."""
        store, train = self.eval_store, self.train_cfg
        _, batches = eval_batches(
            store, limit, micro_batch=train.micro_batch, dp_rank=self.dp_rank,
            dp_size=self.dp_size, needs=Needs(tokens=True, targets=store.has_targets),
        )  # fmt: skip
        kd_weight = self.alpha if store.has_targets else None
        sums = torch.zeros(len(SUMS))
        self.engine.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    batch = batch_to_device(batch, self.device)
                    sums += micro_batch_loss(self.engine, batch, self.cfg.loss, kd_weight)[2].cpu()
        finally:
            self.engine.train()
        return EvalResult.from_sums(sum_to_all(sums.double()), store.has_targets)

    def save(self) -> None:
        """A DeepSpeed checkpoint of this step in kdscale's layout (collective)."""
        path = save_zero_checkpoint(
            self.cfg, self.progress, self.engine, self.scheduler, self.inputs.fingerprints()
        )
        log.info("saved %s", path)

    def export(self) -> Path:
        """The model as an HF directory in ``out/hf`` (collective)."""
        return export_hf_dir(self.engine, self.out / HF_EXPORT, self.start.tokenizer)
