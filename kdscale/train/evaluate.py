"""Held-out evaluation: LM loss, perplexity and (with cached targets) KL to the teacher.

    result = evaluate_model("runs/student", "runs/tokens", cache_dir="runs/cache")   # a checkpoint
    result = evaluate(chunks, objective, samples, limit, ...)   # the model being trained

Used every ``train.eval_every`` steps by the megatron engine, by ``kdscale eval``
(:mod:`kdscale.train.eval_command`) and by a recipe's report. With cached targets two figures
describe the distance to the teacher: ``kl_teacher_tail``, defined the same for every run
(forward KL from the teacher's cached distribution, its top ids plus the tail bucket, to the
student), and ``kd_loss``, the run's own KD term under its ``loss`` section (divergence,
missing-mass buckets, T²). Data-parallel ranks split the samples.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from kdscale.cache.reader import open_samples
from kdscale.config import KDLossConfig, ParallelConfig
from kdscale.data.store import TokenStore
from kdscale.errors import KDScaleError
from kdscale.models import build_model_chunks, validate_layout
from kdscale.models.checkpoints import (
    load_weights,
    read_model_config,
    read_run_config,
    resolve_checkpoint,
)
from kdscale.models.parallel import device, parallel_session
from kdscale.progress import progress_bar
from kdscale.train.checks import check_cache, check_tokens
from kdscale.train.loader import NOTHING, Needs, eval_batches
from kdscale.train.loss_sums import SUMS
from kdscale.train.metrics import perplexity, reports_loss, sum_to_all
from kdscale.train.objective import Objective


@dataclass
class EvalResult:
    """Token-weighted held-out metrics (``kl_teacher_tail`` and ``kd_loss`` only with cached
    targets)."""

    tokens: int
    lm_loss: float
    ppl: float
    kl_teacher_tail: float | None = None
    kd_loss: float | None = None

    @classmethod
    def from_sums(cls, sums: torch.Tensor, has_targets: bool) -> "EvalResult":
        """Per-token means from the all-reduced :data:`SUMS` of an evaluation."""
        total = dict(zip(SUMS, sums.tolist()))
        tokens = max(total["tokens"], 1.0)
        lm = total["lm"] / tokens
        if not has_targets:
            return cls(int(total["tokens"]), lm, perplexity(lm))
        return cls(
            int(total["tokens"]), lm, perplexity(lm), total["kl_teacher_tail"] / tokens,
            total["kd"] / tokens,
        )  # fmt: skip

    def as_dict(self) -> dict[str, float | int]:
        """The result without absent fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def combine(cls, results: list["EvalResult"]) -> "EvalResult":
        """Token-weighted means over several evaluations (the KL figures only if every one has
        them)."""
        tokens = sum(r.tokens for r in results)

        def mean(field: str) -> float | None:
            values = [getattr(r, field) for r in results]
            if any(v is None for v in values):
                return None
            return sum(v * r.tokens for v, r in zip(values, results)) / max(tokens, 1)

        lm = mean("lm_loss")
        return cls(tokens, lm, perplexity(lm), mean("kl_teacher_tail"), mean("kd_loss"))


def eval_metrics(results: dict[str, EvalResult]) -> dict[str, float | int]:
    """``eval/...`` metrics of each source's evaluation: a run on one token set (source ``""``)
    as they are; a blend's under ``eval/<source>/...`` and, over all its held-out tokens, under
    ``eval/...``."""
    if list(results) == [""]:
        return {f"eval/{k}": v for k, v in results[""].as_dict().items()}
    metrics = {f"eval/{k}": v for k, v in EvalResult.combine(list(results.values())).as_dict().items()}
    for name, result in results.items():
        metrics |= {f"eval/{name}/{k}": v for k, v in result.as_dict().items()}
    return metrics


def chunk_needs(model: torch.nn.Module, targets: bool) -> Needs:
    """What a model chunk reads: tokens to embed (first stage); labels and targets (last)."""
    needs = NOTHING
    if get_attr_wrapped_model(model, "pre_process"):
        needs |= Needs(tokens=True, targets=False)
    if get_attr_wrapped_model(model, "post_process"):
        needs |= Needs(tokens=True, targets=targets)
    return needs


def evaluate(
    model: list[torch.nn.Module],
    objective: Objective,
    samples: TokenStore,
    limit: int,
    *,
    micro_batch: int,
    seq_len: int,
    kd_weight: float | None,
    dp_rank: int,
    dp_size: int,
) -> EvalResult:
    """megatron's forward-only schedule over the first ``limit`` samples (collective);
    ``kd_weight`` None evaluates the LM loss alone."""
    objective.kd_weight, objective.validate = kd_weight, False
    iterators, micro_batches = [], 0
    for chunk in model:
        micro_batches, batches = eval_batches(
            samples, limit, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size,
            needs=chunk_needs(chunk, samples.has_targets),
        )  # fmt: skip
        iterators.append(batches)
    bar = progress_bar("evaluating", micro_batches, "batch", leave=False)
    iterators[0] = bar.count(iterators[0], lambda _: micro_batch * seq_len)
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=objective,
                data_iterator=iterators if len(model) > 1 else iterators[0],
                model=model,
                num_microbatches=micro_batches,
                seq_length=seq_len,
                micro_batch_size=micro_batch,
                forward_only=True,
            )
    finally:
        bar.close()
        for chunk in model:
            chunk.train()
    sums = torch.zeros(len(SUMS), dtype=torch.float64)
    if reports_loss():
        sums = torch.stack([o["sums"].double().cpu() for o in outputs]).sum(0)
    return EvalResult.from_sums(sum_to_all(sums), kd_weight is not None)


def evaluate_model(
    checkpoint: str | Path,
    tokens_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    cache_required: bool = True,
    loss: KDLossConfig | None = None,
    split: str = "eval",
    limit: int | None = None,
    micro_batch: int = 4,
    parallel: ParallelConfig | None = None,
    verify: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint (run, checkpoints/ or step directory) on ``split`` of a token set,
    with the KL to the teacher when ``cache_dir`` holds that split (else, unless
    ``cache_required``, without). ``loss`` defaults to the checkpoint's run's. The checkpoint's
    checksums are verified before it loads (``verify=False``: the explicit opt-out). Collective
    over the job's ranks (a world of one without a launcher)."""
    parallel = parallel or ParallelConfig()
    ckpt = resolve_checkpoint(checkpoint, "CKPT")
    model_cfg, run_cfg = read_model_config(ckpt), read_run_config(ckpt)
    loss = loss or run_cfg.loss
    tokens = check_tokens(str(tokens_dir), model_cfg, "--data")
    record = tokens.splits.get(split)
    if record is None or not record.samples:
        raise KDScaleError(f"--split {split}: {tokens_dir} has no samples in that split")
    validate_layout(model_cfg, parallel, int(os.environ.get("WORLD_SIZE", "1")))
    cache = None
    if cache_dir:
        cache = check_cache(str(cache_dir), str(tokens_dir), tokens, model_cfg, loss)
        try:
            cache.shard_names(split)
        except KDScaleError:
            if cache_required:
                raise
            cache = None  # the split is not cached: no KL
    samples = open_samples(tokens_dir, tokens, split, cache)
    try:
        with parallel_session(parallel, seed=run_cfg.train.seed):
            chunks = build_model_chunks(model_cfg, parallel, returns="hidden")
            load_weights(ckpt, chunks, verify)
            objective = Objective(loss, parallel_state.get_tensor_model_parallel_group(), device())
            return evaluate(
                chunks, objective, samples, limit or len(samples),
                micro_batch=micro_batch, seq_len=tokens.seq_len,
                kd_weight=loss.kd_weight if samples.has_targets else None,
                dp_rank=parallel_state.get_data_parallel_rank(),
                dp_size=parallel_state.get_data_parallel_world_size(),
            )  # fmt: skip
    finally:
        samples.close()
