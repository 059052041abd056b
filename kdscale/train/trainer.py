"""The training loop: load or init → per step train, log, evaluate, save → exit cleanly.

    train(cfg, inputs)   # inputs = kdscale.train.checks.check_run(cfg, world_size)

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

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import distrib_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.losses import kd_weight_at
from kdscale.models import build_model_chunks, count_parameters, transformer_config
from kdscale.tracking import start_tracking
from kdscale.train.checkpoint import (
    Progress,
    load_checkpoint,
    load_weights,
    remove_interrupted_saves,
    save_checkpoint,
)
from kdscale.train.checks import RunInputs
from kdscale.train.distributed import destroy_parallel, device, initialize_parallel
from kdscale.train.evaluate import chunk_needs, evaluate
from kdscale.train.loader import NOTHING, GlobalOrder, TrainLoader
from kdscale.train.metrics import (
    MetricsSink,
    eval_line,
    flops_per_token,
    max_memory_gib,
    reports_loss,
    sum_to_all,
    train_line,
)
from kdscale.train.objective import SUMS, Objective, use_sparse_kd_loss
from kdscale.train.optim import build_optimizer
from kdscale.train.samples import SampleStore

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def train(cfg: KDScaleConfig, inputs: RunInputs) -> int:
    """Run (or continue) training as configured; collective over all ranks. Returns 0."""
    transformer_config(cfg.model, cfg.parallel)  # precision/TE problems fail here, first
    if cfg.train.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise KDScaleError(
            "train.use_distributed_optimizer=true needs Transformer Engine or Apex: without "
            "them megatron-core 0.16 cannot checkpoint torch Adam's state in its distributed "
            "optimizer; set train.use_distributed_optimizer=false on this machine"
        )
    stop = StopRequest()  # installed first: a signal during set-up still ends in a clean stop
    previous = {s: signal.signal(s, stop.handle) for s in STOP_SIGNALS}
    initialize_parallel(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg, inputs, stop)
        try:
            return trainer.fit()
        finally:
            trainer.close()
    finally:
        destroy_parallel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """Remembers a stop signal; :meth:`Trainer.fit` acts on it between steps."""

    def __init__(self) -> None:
        self.signum = 0

    def handle(self, signum: int, frame: Any) -> None:
        """Signal handler: record ``signum``."""
        self.signum = signum


class Trainer:
    """The model, optimizer, data and sinks of one run on this rank."""

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
        self.train_store = SampleStore(train.tokens, inputs.tokens, "train", inputs.cache)
        eval_cache = inputs.cache if inputs.cache and self._eval_cached() else None
        self.eval_store = SampleStore(train.tokens, inputs.tokens, "eval", eval_cache)
        needs = NOTHING
        for chunk in self.model:
            needs |= chunk_needs(chunk, targets=inputs.cache is not None)
        self.loader = TrainLoader(
            self.train_store,
            GlobalOrder(len(self.train_store), train.seed),
            consumed_samples=self.progress.consumed_samples,
            global_batch=train.global_batch,
            micro_batch=train.micro_batch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            needs=needs,
            prefetch=train.prefetch_steps,
        )
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len)
        self.sink = MetricsSink(self.out, self._tracker() if self.rank0 else None)
        self.window = self._empty_window()

    def _eval_cached(self) -> bool:
        split = self.inputs.tokens.splits.get("eval")
        names = {s.name for s in split.shards} if split is not None else set()
        cached = names <= set(self.inputs.cache.manifest.shards)
        if not cached and self.rank0:
            log.warning("the eval split is not cached: evaluating the LM loss without KL")
        return cached

    def _tracker(self) -> Any:
        config = self.cfg.model_dump(mode="json") | {
            "inputs": self.inputs.fingerprints(),
            "layout": {"world_size": self.inputs.world_size, "data": self.inputs.data_parallel},
            "parameters": count_parameters(self.cfg.model),
        }
        return start_tracking(self.cfg.wandb, "train", self.out, config)

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train until ``train.steps`` (or a stop request); save; return 0."""
        train = self.train_cfg
        if self.progress.step == 0 and train.steps == 0:
            self._save()
        elif self.progress.step >= train.steps:
            log.info("%s is already at step %d of %d", self.out, self.progress.step, train.steps)
        while self.progress.step < train.steps:
            self.train_step()
            step = self.progress.step
            if step % train.log_every == 0 or step == train.steps:
                self._log()
            stop = self._stop_requested()
            if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
                self._evaluate()
            exit_now = bool(train.exit_interval) and step % train.exit_interval == 0
            if stop or exit_now or step == train.steps or (
                train.save_every and step % train.save_every == 0
            ):
                self._save()
            if stop or exit_now:
                reason = signal.Signals(stop).name if stop else "train.exit_interval"
                log.info("stopping after step %d (%s); run again to resume", step, reason)
                break
        return 0

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
        self.progress.step += 1
        self.progress.consumed_samples += self.train_cfg.global_batch
        self.progress.consumed_tokens += self.train_cfg.global_batch * self.seq_len
        if reports_loss():
            self.window["sums"] += torch.stack([o["sums"] for o in outputs]).sum(0).double().cpu()
        self.window["steps"] += 1
        self.window["grad_norm"] += grad_norm if grad_norm is not None else math.nan
        self.window["seconds"] += time.perf_counter() - start

    # --- logging, evaluation, saving, stopping --------------------------------------------------

    @staticmethod
    def _empty_window() -> dict[str, Any]:
        return {"sums": torch.zeros(len(SUMS), dtype=torch.float64), "steps": 0,
                "grad_norm": 0.0, "seconds": 0.0}  # fmt: skip

    def _log(self) -> None:
        window, self.window = self.window, self._empty_window()
        total = dict(zip(SUMS, sum_to_all(window["sums"]).tolist()))
        memory = sum_to_all(torch.tensor([max_memory_gib()]), dist.ReduceOp.MAX).item()
        tokens_per_s = window["steps"] * self.train_cfg.global_batch * self.seq_len / max(
            window["seconds"], 1e-9
        )
        tokens = max(total["tokens"], 1.0)
        metrics = {
            "loss/total": total["loss"] / tokens,
            "loss/lm": total["lm"] / tokens,
            "optim/lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "optim/grad_norm": window["grad_norm"] / window["steps"],
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/mfu": tokens_per_s * self.flops_per_token
            / (self.train_cfg.peak_flops * dist.get_world_size()),
            "memory/max_gib": memory,
            "progress/consumed_samples": self.progress.consumed_samples,
            "progress/consumed_tokens": self.progress.consumed_tokens,
        }
        if self.objective.kd:
            metrics |= {
                "loss/kd": total["kd"] / tokens,
                "kd/kl": total["kl"] / tokens,
                "kd/covered_mass": total["covered_mass"] / tokens,
                "kd/weight": self.objective.kd_weight,
            }
        self.sink.write(self.progress.step, metrics, train_line(metrics))

    def _evaluate(self) -> None:
        if not len(self.eval_store):
            return
        limit = len(self.eval_store)
        if self.train_cfg.eval_batches is not None:
            limit = self.train_cfg.eval_batches * self.train_cfg.global_batch
        result = evaluate(
            self.model,
            self.eval_store,
            limit,
            micro_batch=self.train_cfg.micro_batch,
            seq_len=self.seq_len,
            kd_weight=self.objective.kd_weight,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        metrics = {f"eval/{k}": v for k, v in result.as_dict().items()}
        self.sink.write(self.progress.step, metrics, eval_line(metrics))

    def _save(self) -> None:
        path = save_checkpoint(
            self.cfg, self.progress, self.chunks, self.optimizer, self.scheduler,
            self.inputs.fingerprints(),
        )  # fmt: skip
        log.info("saved %s", path)

    def _stop_requested(self) -> int:
        """The stop signal any rank received (0: none); every rank gets the same answer."""
        flag = torch.tensor([float(self.stop.signum)])
        return int(sum_to_all(flag, dist.ReduceOp.MAX).item())

    def close(self) -> None:
        """Stop the loader thread, close files and the W&B run."""
        self.loader.close()
        self.train_store.close()
        self.eval_store.close()
        self.sink.close()
