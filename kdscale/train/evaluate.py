"""Held-out evaluation: LM loss, perplexity and (with cached targets) KL to the teacher.

Used every ``train.eval_every`` steps by the trainer and by ``kdscale eval``
(:mod:`kdscale.train.eval_command`). The KL is the ``kl`` metric of ``kd_lm_loss`` under the
run's ``loss`` section: forward KL on the cached support (with ``missing_mass: tail`` the rest
of the vocabulary is one more bucket). Data-parallel ranks split the samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from kdscale.config import KDLossConfig, ModelConfig, ParallelConfig
from kdscale.models import build_model_chunks
from kdscale.train.checkpoint import load_weights
from kdscale.train.distributed import device
from kdscale.train.loader import NOTHING, Needs, eval_batches
from kdscale.train.metrics import perplexity, reports_loss, sum_to_all
from kdscale.train.objective import SUMS, Objective, use_sparse_kd_loss
from kdscale.train.samples import SampleStore


@dataclass
class EvalResult:
    """Token-weighted held-out metrics (``kl`` only with cached targets)."""

    tokens: int
    lm_loss: float
    ppl: float
    kl: float | None = None

    @classmethod
    def from_sums(cls, sums: torch.Tensor, has_targets: bool) -> "EvalResult":
        """Per-token means from the all-reduced :data:`SUMS` of an evaluation."""
        total = dict(zip(SUMS, sums.tolist()))
        tokens = max(total["tokens"], 1.0)
        lm = total["lm"] / tokens
        kl = total["kl"] / tokens if has_targets else None
        return cls(int(total["tokens"]), lm, perplexity(lm), kl)

    def as_dict(self) -> dict[str, float | int]:
        """The result without absent fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}


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
    store: SampleStore,
    limit: int,
    *,
    micro_batch: int,
    seq_len: int,
    kd_weight: float,
    dp_rank: int,
    dp_size: int,
) -> EvalResult:
    """Forward-only pass over the first ``limit`` samples of ``store`` (collective)."""
    objective = Objective(kd=store.has_targets, device=device())
    objective.kd_weight = kd_weight
    iterators, micro_batches = [], 0
    for chunk in model:
        micro_batches, batches = eval_batches(
            store, limit, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size,
            needs=chunk_needs(chunk, store.has_targets),
        )  # fmt: skip
        iterators.append(batches)
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
        for chunk in model:
            chunk.train()
    sums = torch.zeros(len(SUMS), dtype=torch.float64)
    if reports_loss():
        sums = torch.stack([o["sums"].double().cpu() for o in outputs]).sum(0)
    return EvalResult.from_sums(sum_to_all(sums), store.has_targets)


def evaluate_checkpoint(
    ckpt: Path,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    loss: KDLossConfig,
    store: SampleStore,
    *,
    limit: int,
    micro_batch: int,
    seq_len: int,
) -> EvalResult:
    """Build the model at ``parallel``, load ``ckpt``'s weights and evaluate the first ``limit``
    samples of ``store`` under ``loss`` (collective)."""
    chunks: list[GPTModel] = build_model_chunks(model_cfg, parallel)
    load_weights(ckpt, chunks)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        use_sparse_kd_loss(chunk, loss, tp_group)
    return evaluate(
        chunks,
        store,
        limit,
        micro_batch=micro_batch,
        seq_len=seq_len,
        kd_weight=loss.kd_weight,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
