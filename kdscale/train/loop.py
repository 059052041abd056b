"""The training loop both engines share: step, log, evaluate, save, stop — in that order.

    with catch_stop_signals() as stop:
        trainer = SomeEngineTrainer(cfg, inputs, stop)   # a TrainLoop subclass
        trainer.fit()

An engine (megatron: :mod:`kdscale.train.trainer`; DeepSpeed ZeRO: :mod:`kdscale.train.zero`)
supplies one optimizer step (:meth:`TrainLoop.train_step`, which adds to the log window), a
held-out evaluation (:meth:`TrainLoop.evaluate_samples`) and a checkpoint save
(:meth:`TrainLoop.save`); this class decides when each happens, turns the window into the
``metrics.jsonl`` / W&B line, and stops cleanly on SIGTERM/SIGUSR1 or ``train.exit_interval``.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdscale.config import KDScaleConfig, TrainConfig
from kdscale.logging import get_logger
from kdscale.models import count_parameters
from kdscale.tracking import Tracker, start_tracking
from kdscale.train.checkpoint import Progress
from kdscale.train.checks import RunInputs
from kdscale.train.evaluate import EvalResult
from kdscale.train.loader import GlobalOrder, Needs, TrainLoader
from kdscale.train.loss_sums import SUMS
from kdscale.train.metrics import (
    MetricsSink,
    eval_line,
    flops_per_token,
    max_memory_gib,
    sum_to_all,
    train_line,
)
from kdscale.train.samples import SampleStore

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers a stop signal; :meth:`TrainLoop.fit` acts on it between steps."""

    def __init__(self) -> None:
        self.signum = 0

    def handle(self, signum: int, frame: Any) -> None:
        """Signal handler: record ``signum``."""
        self.signum = signum


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Record SIGTERM/SIGUSR1 (instead of dying) for the duration of the block."""
    stop = StopRequest()
    previous = {s: signal.signal(s, stop.handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TrainLoop:
    """The engine-independent part of a run. Subclasses set, in ``__init__``: ``cfg``,
    ``inputs``, ``train_cfg``, ``out``, ``seq_len``, ``stop``, ``progress``, ``optimizer`` (its
    ``param_groups`` carry the LR), ``scheduler`` (megatron's ``OptimizerParamScheduler``),
    ``dp_rank``, ``dp_size``, then call :meth:`open_data_and_sinks`; and :meth:`close` at the
    end."""

    cfg: KDScaleConfig
    inputs: RunInputs
    train_cfg: TrainConfig
    out: Path
    seq_len: int
    stop: StopRequest
    progress: Progress
    optimizer: Any
    scheduler: Any
    train_store: SampleStore
    eval_store: SampleStore
    loader: TrainLoader
    dp_rank: int
    dp_size: int
    flops_per_token: float
    sink: MetricsSink
    window: dict[str, Any]

    # --- what an engine provides ----------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step over the next global batch; advances ``progress`` and calls
        :meth:`record_step`."""
        raise NotImplementedError

    def evaluate_samples(self, limit: int) -> EvalResult:
        """Evaluate the first ``limit`` samples of ``eval_store`` (collective)."""
        raise NotImplementedError

    def save(self) -> None:
        """Save a checkpoint of ``progress`` (collective)."""
        raise NotImplementedError

    def kd_weight(self) -> float | None:
        """α of the last step; None when training without teacher targets."""
        raise NotImplementedError

    # --- set-up ---------------------------------------------------------------------------------

    def open_data_and_sinks(self, needs: Needs) -> None:
        """Set ``train_store``, ``eval_store``, ``loader`` (from ``progress``), the MFU FLOP
        count, the metrics sink and an empty window; needs ``cfg``, ``inputs``, ``progress``,
        ``dp_rank``, ``dp_size`` set."""
        train = self.train_cfg
        self.train_store, self.eval_store = _open_stores(train, self.inputs)
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
        self.flops_per_token = flops_per_token(self.cfg.model, self.seq_len)
        tracker = None
        if dist.get_rank() == 0:
            tracker = _run_tracker(self.cfg, self.inputs, self.out)
        self.sink = MetricsSink(self.out, tracker)
        self.window = empty_window()

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train until ``train.steps`` (or a stop request); save; return 0."""
        train = self.train_cfg
        if self.progress.step == 0 and train.steps == 0:
            self.save()
        elif self.progress.step >= train.steps:
            log.info("%s is already at step %d of %d", self.out, self.progress.step, train.steps)
        while self.progress.step < train.steps:
            self.train_step()
            step = self.progress.step
            if step % train.log_every == 0 or step == train.steps:
                self.log_window()
            stop = self.stop_requested()
            if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
                self.evaluate()
            exit_now = bool(train.exit_interval) and step % train.exit_interval == 0
            if stop or exit_now or step == train.steps or (
                train.save_every and step % train.save_every == 0
            ):
                self.save()
            if stop or exit_now:
                reason = signal.Signals(stop).name if stop else "train.exit_interval"
                log.info("stopping after step %d (%s); run again to resume", step, reason)
                break
        return 0

    def advance(self) -> None:
        """Count one finished optimizer step of ``train.global_batch`` samples."""
        self.progress.step += 1
        self.progress.consumed_samples += self.train_cfg.global_batch
        self.progress.consumed_tokens += self.train_cfg.global_batch * self.seq_len

    def record_step(
        self, sums: torch.Tensor | None, grad_norm: float | None, seconds: float
    ) -> None:
        """Add one step to the log window (``sums``: this rank's :data:`SUMS`, or None)."""
        if sums is not None:
            self.window["sums"] += sums.double().cpu()
        self.window["steps"] += 1
        self.window["grad_norm"] += grad_norm if grad_norm is not None else math.nan
        self.window["seconds"] += seconds

    # --- logging, evaluation, stopping ----------------------------------------------------------

    def log_window(self) -> None:
        """Reduce the window over all ranks (one host sync) and write one metrics line."""
        window, self.window = self.window, empty_window()
        total = dict(zip(SUMS, sum_to_all(window["sums"]).tolist()))
        memory = sum_to_all(torch.tensor([max_memory_gib()]), dist.ReduceOp.MAX).item()
        train = self.train_cfg
        tokens_per_s = window["steps"] * train.global_batch * self.seq_len / max(
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
            / (train.peak_flops * dist.get_world_size()),
            "memory/max_gib": memory,
            "progress/consumed_samples": self.progress.consumed_samples,
            "progress/consumed_tokens": self.progress.consumed_tokens,
        }
        kd_weight = self.kd_weight()
        if kd_weight is not None:
            metrics |= {
                "loss/kd": total["kd"] / tokens,
                "kd/kl": total["kl"] / tokens,
                "kd/covered_mass": total["covered_mass"] / tokens,
                "kd/weight": kd_weight,
            }
        self.sink.write(self.progress.step, metrics, train_line(metrics))

    def evaluate(self) -> None:
        """Evaluate ``train.eval_batches`` global batches (all of the split by default); log."""
        if not len(self.eval_store):
            return
        limit = len(self.eval_store)
        if self.train_cfg.eval_batches is not None:
            limit = self.train_cfg.eval_batches * self.train_cfg.global_batch
        metrics = {f"eval/{k}": v for k, v in self.evaluate_samples(limit).as_dict().items()}
        self.sink.write(self.progress.step, metrics, eval_line(metrics))

    def close(self) -> None:
        """Stop the loader thread, close files and the W&B run."""
        self.loader.close()
        self.train_store.close()
        self.eval_store.close()
        self.sink.close()

    def stop_requested(self) -> int:
        """The stop signal any rank received (0: none); every rank gets the same answer."""
        flag = torch.tensor([float(self.stop.signum)])
        return int(sum_to_all(flag, dist.ReduceOp.MAX).item())


def _open_stores(train: TrainConfig, inputs: RunInputs) -> tuple[SampleStore, SampleStore]:
    """The train and eval splits; the eval split carries targets only if all of it is cached."""
    train_store = SampleStore(train.tokens, inputs.tokens, "train", inputs.cache)
    eval_cache = None
    if inputs.cache is not None:
        split = inputs.tokens.splits.get("eval")
        names = {s.name for s in split.shards} if split is not None else set()
        if names <= set(inputs.cache.manifest.shards):
            eval_cache = inputs.cache
        elif dist.get_rank() == 0:
            log.warning("the eval split is not cached: evaluating the LM loss without KL")
    return train_store, SampleStore(train.tokens, inputs.tokens, "eval", eval_cache)


def _run_tracker(cfg: KDScaleConfig, inputs: RunInputs, out: Path) -> Tracker:
    """The W&B run (or its disabled stand-in) of a training run, with its inputs and layout."""
    config = cfg.model_dump(mode="json") | {
        "inputs": inputs.fingerprints(),
        "layout": {"world_size": inputs.world_size, "data": inputs.data_parallel},
        "parameters": count_parameters(cfg.model),
    }
    return start_tracking(cfg.wandb, "train", out, config)


def empty_window() -> dict[str, Any]:
    """A log window with no steps in it."""
    return {"sums": torch.zeros(len(SUMS), dtype=torch.float64), "steps": 0,
            "grad_norm": 0.0, "seconds": 0.0}  # fmt: skip
