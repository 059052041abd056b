"""The training loop: one loop drives either engine — step, log, evaluate, save, stop, in that order.

    train(cfg, inputs, parallel=cfg.parallel, build_engine=lambda: MegatronEngine(cfg, inputs))

An engine (:class:`Engine`: megatron-core in :mod:`kdscale.train.megatron_engine`, DeepSpeed ZeRO
in :mod:`kdscale.train.deepspeed_engine`) owns the model, the optimizer and their checkpoints and
runs one optimizer step over the micro-batches it is handed. This loop owns the rest: the data
order (:mod:`kdscale.train.loader`), the KD weight of each step, the log window and its sinks
(console, ``metrics.jsonl``, W&B), when to evaluate and save, and clean stops (SIGTERM/SIGUSR1
or ``train.exit_interval``).

Host synchronisation: the loop adds none per step. Metric sums stay on the device between log
steps; a log step reduces them over all ranks (one SUM and one MAX all-reduce: a host sync), and
the ranks agree on a pending stop signal then and every ``train.stop_check_every`` steps (one
small all-reduce). The syncs inside each engine's step are marked there.

A loss or gradient norm that is not finite stops the run with one line (exit status 2), found
where the sums reach the host anyway: at the log step's reduction, and before every save (one
more small all-reduce per save), so a non-finite model is never checkpointed.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from kdscale.config import KDScaleConfig, ParallelConfig, write_resolved_config
from kdscale.data.store import TokenStore
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.losses import kd_weight_at
from kdscale.models import count_parameters
from kdscale.models.parallel import destroy_parallel, initialize_parallel
from kdscale.progress import progress_bar
from kdscale.tracking import Tracker, start_tracking
from kdscale.train.checkpoint import Progress, remove_interrupted_saves
from kdscale.train.checks import RunInputs
from kdscale.train.evaluate import EvalResult, eval_metrics
from kdscale.train.loader import MicroBatch, Needs, TrainLoader
from kdscale.train.loss_sums import SUMS
from kdscale.train.metrics import (
    MetricsSink,
    eval_line,
    flops_per_token,
    max_memory_gib,
    sum_to_all,
    train_line,
)
from kdscale.train.sources import open_run_data

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StepResult:
    """What one optimizer step reports: this rank's :data:`~kdscale.train.loss_sums.SUMS` on the
    device (None on ranks that compute no loss) and the global gradient norm (a float, a device
    tensor, or None when the engine does not expose it)."""

    sums: torch.Tensor | None
    grad_norm: float | torch.Tensor | None


class Engine(Protocol):
    """What the loop needs from a training engine.

    ``progress`` is where the run stands when the engine is built (restored from
    ``inputs.resume_from``, else zero); ``origin`` what the weights started from, for the log
    (:func:`kdscale.train.checks.start_note`); ``needs`` what this rank reads of each
    micro-batch.
    """

    progress: Progress
    origin: str
    needs: Needs
    dp_rank: int
    dp_size: int
    device: torch.device

    def train_step(
        self, batches: list[MicroBatch], kd_weight: float | None, validate: bool
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches (``kd_weight`` None: LM loss only;
        ``validate``: check the loss inputs' values this step)."""
        ...

    def evaluate(self, samples: TokenStore, limit: int, kd_weight: float | None) -> EvalResult:
        """Held-out metrics of the first ``limit`` samples (collective)."""
        ...

    def save(self, progress: Progress) -> Path:
        """A checkpoint of the run at ``progress`` (collective); returns its directory."""
        ...

    def learning_rate(self) -> float:
        """The rate of the last step."""
        ...

    def finish(self) -> None:
        """Called once the run has reached ``train.steps`` (collective)."""
        ...


class StopRequest:
    """Remembers a stop signal; the loop acts on it between steps."""

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


def train(
    cfg: KDScaleConfig,
    inputs: RunInputs,
    parallel: ParallelConfig,
    build_engine: Callable[[], Engine],
) -> int:
    """Run (or continue) training as configured, collective over all ranks; returns 0.

    Signals are caught first, so one during set-up still ends in a clean stop; ``parallel`` is
    the layout the engine's process groups need.
    """
    with catch_stop_signals() as stop:
        initialize_parallel(parallel, seed=cfg.train.seed)
        try:
            if dist.get_rank() == 0:
                out = Path(cfg.train.out)
                out.mkdir(parents=True, exist_ok=True)
                remove_interrupted_saves(out)
                write_resolved_config(cfg, out)
            loop = TrainLoop(cfg, inputs, build_engine(), stop)
            try:
                return loop.fit()
            finally:
                loop.close()
        finally:
            destroy_parallel()


class LogWindow:
    """Sums over the steps since the last log line, kept on the device until it is written."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.norm_steps = 0  # steps whose engine reported a gradient norm
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, result: StepResult) -> None:
        """Add one step (no host sync: device tensors are added on the device)."""
        if result.sums is not None:
            self.sums += result.sums.to(torch.float64)
        if result.grad_norm is not None:
            self.grad_norm += result.grad_norm
            self.norm_steps += 1
        self.steps += 1

    def mean_grad_norm(self, grad_norm: float) -> float:
        """The window's mean gradient norm from its (host) sum; NaN when none was reported."""
        return grad_norm / self.norm_steps if self.norm_steps else math.nan

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (evaluation, saving) out of the window."""
        self.started += seconds


class TrainLoop:
    """The data, sinks and schedule of one run on this rank, around its engine."""

    def __init__(
        self, cfg: KDScaleConfig, inputs: RunInputs, engine: Engine, stop: StopRequest
    ) -> None:
        self.cfg, self.inputs, self.engine, self.stop = cfg, inputs, engine, stop
        self.train_cfg = train = cfg.train
        self.out = Path(train.out)
        self.seq_len = inputs.tokens.seq_len
        self.progress = engine.progress
        self.first_step = self.progress.step
        self.kd_weight = cfg.loss.kd_weight if inputs.cache is not None else None  # last step's α
        self.data = open_run_data(inputs, train.seed, self.progress.source_samples)
        self.loader = TrainLoader(
            self.data.train,
            self.data.order,
            consumed_samples=self.progress.consumed_samples,
            global_batch=train.global_batch,
            micro_batch=train.micro_batch,
            dp_rank=engine.dp_rank,
            dp_size=engine.dp_size,
            needs=engine.needs,
            prefetch=train.prefetch_steps,
        )
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len)
        tracker = _run_tracker(cfg, inputs, self.out) if dist.get_rank() == 0 else None
        self.sink = MetricsSink(self.out, tracker, resumed_step=self.progress.step)
        self.window = LogWindow(engine.device)
        self.bar = progress_bar("training", train.steps, "step", initial=self.progress.step)

    def fit(self) -> int:
        """Train until ``train.steps`` (or a stop request); save; return 0."""
        train = self.train_cfg
        self.log_start()
        if self.progress.step == 0 and train.steps == 0:
            self.save()
        elif self.progress.step >= train.steps:
            log.info("%s is already at step %d of %d", self.out, self.progress.step, train.steps)
        while self.progress.step < train.steps:
            self.train_step()
            step = self.progress.step
            self.bar.update(1, tokens=train.global_batch * self.seq_len)
            stop = self.end_of_step()
            began = time.perf_counter()
            if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
                self.evaluate()
            exit_now = bool(train.exit_interval) and step % train.exit_interval == 0
            if stop or exit_now or step == train.steps or (
                train.save_every and step % train.save_every == 0
            ):
                self.save()
            self.window.exclude(time.perf_counter() - began)
            if stop or exit_now:
                reason = signal.Signals(stop).name if stop else "train.exit_interval"
                log.info("stopping after step %d (%s); run again to resume", step, reason)
                break
        if self.progress.step >= train.steps:
            self.engine.finish()
        return 0

    def log_start(self) -> None:
        """Say what the student starts from and which samples it trains on."""
        train, inputs = self.train_cfg, self.inputs
        available = len(self.data.train)
        drawn = (
            f"the first {inputs.train_samples} of {available} training samples (train.max_samples)"
            if train.max_samples is not None else f"{available} training samples"
        )  # fmt: skip
        if inputs.blend:
            drawn += " in a blend of " + ", ".join(
                f"{s.name} ({len(store)}, weight {s.weight:g})"
                for s, store in zip(inputs.sources, self.data.train.stores)
            )
        epochs = train.steps * train.global_batch / (available if inputs.blend else inputs.train_samples)
        log.info("student %s", self.engine.origin)
        log.info("data: %s, %d steps × %d samples = %.3g epochs", drawn, train.steps,
                 train.global_batch, epochs)  # fmt: skip

    def train_step(self) -> None:
        """One optimizer step over the next global batch; adds it to the log window."""
        step = self.progress.step  # 0-based index of this step
        if self.kd_weight is not None:
            self.kd_weight = kd_weight_at(self.cfg.loss, step, self.train_cfg.steps)
        every = self.cfg.loss.validate_every
        validate = step == self.first_step or bool(every and step % every == 0)
        result = self.engine.train_step(self.loader.next_step(), self.kd_weight, validate)
        self.progress.step += 1
        self.progress.consumed_samples += self.train_cfg.global_batch
        self.progress.consumed_tokens += self.train_cfg.global_batch * self.seq_len
        if self.inputs.blend:
            counts = self.data.order.counts(self.progress.consumed_samples, self.train_cfg.global_batch)
            self.progress.source_samples = {s.name: c for s, c in zip(self.inputs.sources, counts)}
        self.window.add(result)

    def end_of_step(self) -> int:
        """Write the log line at log steps; return the stop signal the ranks agree on (0: none).

        The ranks compare notes at log steps and every ``train.stop_check_every`` steps.
        """
        step, train = self.progress.step, self.train_cfg
        if step % train.log_every == 0 or step == train.steps:
            return self.log_window()
        if step % train.stop_check_every == 0:
            flag = torch.tensor([float(self.stop.signum)])
            return int(sum_to_all(flag, dist.ReduceOp.MAX).item())  # host sync (marked)
        return 0

    def log_window(self) -> int:
        """Reduce the window over all ranks (the host sync of a log step), write one metrics
        line, start a new window; returns the agreed stop signal."""
        window, self.window = self.window, LogWindow(self.window.sums.device)
        total = dict(zip(SUMS, sum_to_all(window.sums).tolist()))  # host sync
        memory, stop = sum_to_all(
            torch.tensor([max_memory_gib(), float(self.stop.signum)]), dist.ReduceOp.MAX
        ).tolist()
        seconds = max(time.perf_counter() - window.started, 1e-9)
        train = self.train_cfg
        tokens_per_s = window.steps * train.global_batch * self.seq_len / seconds
        tokens = max(total["tokens"], 1.0)
        metrics = {
            "loss/total": total["loss"] / tokens,
            "loss/lm": total["lm"] / tokens,
            "optim/lr": self.engine.learning_rate(),
            "optim/grad_norm": window.mean_grad_norm(float(window.grad_norm)),  # synced above
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/mfu": tokens_per_s * self.flops_per_token
            / (train.peak_flops * dist.get_world_size()),
            "memory/max_gib": memory,
            "progress/consumed_samples": self.progress.consumed_samples,
            "progress/consumed_tokens": self.progress.consumed_tokens,
        }
        if self.kd_weight is not None:
            metrics |= {
                "loss/kd": total["kd"] / tokens,
                "kd/kl_teacher_tail": total["kl_teacher_tail"] / tokens,
                "kd/covered_mass": total["covered_mass"] / tokens,
                "kd/weight": self.kd_weight,
            }
        self.sink.write(self.progress.step, metrics, train_line(metrics))
        self.refuse_nonfinite(total["loss"], float(window.grad_norm) if window.norm_steps else 0.0)
        return int(stop)

    def refuse_nonfinite(self, loss_sum: float, grad_norm_sum: float) -> None:
        """Stop with one line, before anything more is saved, when the window's loss or gradient
        norm is not finite (the values are the all-reduced ones: every rank stops alike)."""
        for what, value in (("loss", loss_sum), ("gradient norm", grad_norm_sum)):
            if not math.isfinite(value):
                raise KDScaleError(
                    f"the {what} is not finite ({value}) in the steps up to {self.progress.step}; "
                    "stopping without saving them (the newest checkpoint in "
                    f"{self.out / 'checkpoints'} predates them): lower train.lr.lr, set "
                    "train.optimizer.clip_grad, or check the inputs"
                )

    def check_window(self) -> None:
        """Before a save: refuse a non-finite loss or gradient norm in the steps not yet logged
        (one small all-reduce, on a copy: the window is reduced again at its log step)."""
        window = self.window
        if not window.steps:
            return
        values = torch.stack([window.sums[SUMS.index("loss")], window.grad_norm]).clone()
        loss_sum, grad_norm_sum = sum_to_all(values).tolist()  # host sync (a save is one anyway)
        self.refuse_nonfinite(loss_sum, grad_norm_sum)

    def evaluate(self) -> None:
        """Evaluate ``train.eval_batches`` global batches (all of the split by default) of each
        source's eval split; log per source and, for a blend, over all of them."""
        results = {}
        for name, samples in self.data.evals.items():
            if not len(samples):
                continue
            limit = len(samples)
            if self.train_cfg.eval_batches is not None:
                limit = self.train_cfg.eval_batches * self.train_cfg.global_batch
            kd_weight = self.kd_weight if samples.has_targets else None
            results[name] = self.engine.evaluate(samples, limit, kd_weight)
        if results:
            metrics = eval_metrics(results)
            self.sink.write(self.progress.step, metrics, eval_line(metrics))

    def save(self) -> None:
        """A checkpoint of this step (collective), never of a model trained on a non-finite loss
        or gradient."""
        self.check_window()
        log.info("saved %s", self.engine.save(self.progress))

    def close(self) -> None:
        """Stop the loader thread and the progress bar, close files and the W&B run."""
        self.bar.close()
        self.loader.close()
        self.data.close()
        self.sink.close()


def _run_tracker(cfg: KDScaleConfig, inputs: RunInputs, out: Path) -> Tracker:
    """The W&B run (or its disabled stand-in) of a training run, with its inputs and layout."""
    config = cfg.model_dump(mode="json") | {
        "inputs": inputs.fingerprints(),
        "layout": {"world_size": inputs.world_size, "data": inputs.data_parallel},
        "parameters": count_parameters(cfg.model),
    }
    return start_tracking(cfg.wandb, "train", out, config)
