"""The per-micro-batch objective handed to megatron's schedules as ``forward_step_func``.

With a cache, the loss is :func:`kdscale.losses.kd_lm_loss` on the student's vocab-parallel
logits; without one, megatron's own vocab-parallel cross-entropy. Both run where GPTModel
computes its LM loss (:func:`use_sparse_kd_loss`), so the logits stay in megatron's
``[S, B, V/TP]`` layout and their storage can be reused by the loss, exactly as on the LM
path; the model returns the per-token loss ``[B, S]`` either way.

Losses are token sums: megatron's ``calculate_per_token_loss`` divides the gradients by the
tokens of the whole global batch (summed over micro-batches and data-parallel ranks), so the
step is the same whatever the layout and micro-batch split. Each micro-batch also reports
token-weighted metric sums (:data:`kdscale.train.loss_sums.SUMS`) for logging.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.utils import get_attr_wrapped_model

from kdscale.cache.targets import SparseTargets
from kdscale.config.loss import KDLossConfig
from kdscale.losses import kd_lm_loss
from kdscale.train.loader import MicroBatch
from kdscale.train.loss_sums import SUMS, token_sums

__all__ = [
    "SUMS", "Objective", "SparseKDLabels", "batch_to_device", "use_sparse_kd_loss",
]  # fmt: skip



class SparseKDLabels:
    """Labels that carry a micro-batch's teacher targets into GPTModel's loss computation."""

    def __init__(
        self,
        labels_BS: torch.Tensor,
        targets: SparseTargets,
        mask_BS: torch.Tensor | None,
        kd_weight: float,
    ) -> None:
        self.labels_BS, self.targets, self.mask_BS, self.kd_weight = (
            labels_BS, targets, mask_BS, kd_weight,
        )  # fmt: skip
        self.metrics: dict[str, torch.Tensor] | None = None


def use_sparse_kd_loss(
    gpt: GPTModel, loss: KDLossConfig, tp_group: dist.ProcessGroup | None
) -> None:
    """Let ``gpt`` compute ``kd_lm_loss`` in place of its LM cross-entropy when its ``labels``
    are :class:`SparseKDLabels` (tensor labels keep megatron's cross-entropy)."""
    lm_loss = gpt.compute_language_model_loss

    def compute(labels: Any, logits_SBV: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, SparseKDLabels):
            return lm_loss(labels, logits_SBV)
        out = kd_lm_loss(
            logits_SBV,
            labels.targets,
            labels.labels_BS,
            loss,
            tp_group,
            loss_mask=labels.mask_BS,
            kd_weight=labels.kd_weight,
        )
        labels.metrics = out.metrics
        return out.loss

    gpt.compute_language_model_loss = compute


class Objective:
    """``forward_step_func`` for megatron's schedules (one instance per run).

    ``kd_weight`` (α) is set by the trainer before each step. Every chunk draws one micro-batch
    per call, so all chunks' iterators stay in step; a chunk that neither embeds tokens nor
    computes the loss ignores it (and during evaluation is handed empty ones).
    """

    def __init__(self, kd: bool, device: torch.device) -> None:
        self.kd, self.device = kd, device
        self.kd_weight = 1.0

    def __call__(
        self, data_iterator: Iterator[MicroBatch], model: torch.nn.Module
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
        batch = batch_to_device(next(data_iterator), self.device)
        pre_process = get_attr_wrapped_model(model, "pre_process")
        post_process = get_attr_wrapped_model(model, "post_process")
        inputs = batch.tokens[:, :-1] if pre_process else None
        if not post_process:
            return model(inputs, None, None), _not_last_stage
        labels: Any = batch.tokens[:, 1:]
        if self.kd:
            labels = SparseKDLabels(labels, batch.targets, batch.mask, self.kd_weight)
        loss_BS = model(inputs, None, None, labels=labels)
        return loss_BS, functools.partial(_reduce, labels, batch.mask)


def batch_to_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    """``batch`` with its tensors on ``device`` (the same object when already there)."""
    if batch.tokens is None or batch.tokens.device == device:
        return batch
    return MicroBatch(
        batch.tokens.to(device, non_blocking=True),
        batch.targets.to(device) if batch.targets is not None else None,
        batch.mask.to(device, non_blocking=True) if batch.mask is not None else None,
    )


def _not_last_stage(output: torch.Tensor) -> tuple:
    raise AssertionError("megatron called the loss function on a stage without the loss")


def _reduce(labels: Any, mask_BS: torch.Tensor | None, loss_BS: torch.Tensor) -> tuple:
    """``(loss sum, token count, {"sums": metric sums})`` for megatron's per-token loss mode."""
    metrics = labels.metrics if isinstance(labels, SparseKDLabels) else None
    total, tokens, sums = token_sums(loss_BS, mask_BS, metrics)
    return total, tokens.int(), {"sums": sums}
