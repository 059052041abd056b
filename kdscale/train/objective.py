"""The student's loss on one micro-batch, and the ``forward_step_func`` megatron's schedules run.

On the last pipeline stage the student returns its final-norm hidden states
(:class:`kdscale.models.gpt.HiddenStateGPTModel`) and :func:`student_loss` turns them into the
loss: by default through :func:`kdscale.train.head_loss.head_loss` (the vocab-parallel output
layer fused into the loss, tied embeddings included: the logits never exist whole); with
``loss.fused_head=false`` it applies the output layer and then
:func:`kdscale.losses.kd_lm_loss` against the cached teacher targets, or megatron's
vocab-parallel cross-entropy without a cache (the logits stay in megatron's ``[S, B, V/TP]``
layout and the loss, their last reader, may reuse their storage).

Losses are token sums: megatron's ``calculate_per_token_loss`` divides the gradients by the
tokens of the whole global batch (summed over micro-batches and data-parallel ranks), so the
step is the same whatever the layout and micro-batch split. Each micro-batch also reports
token-weighted metric sums (:data:`kdscale.train.loss_sums.SUMS`) for logging.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.utils import get_attr_wrapped_model

from kdscale.config.loss import KDLossConfig
from kdscale.losses import kd_lm_loss
from kdscale.models.gpt import HiddenStateGPTModel
from kdscale.train.head_loss import head_loss
from kdscale.train.loader import MicroBatch, batch_to_device
from kdscale.train.loss_sums import token_sums


def student_loss(
    gpt: HiddenStateGPTModel,
    hidden_SBH: torch.Tensor,
    batch: MicroBatch,
    cfg: KDLossConfig,
    kd_weight: float | None,
    tp_group: dist.ProcessGroup | None,
    validate: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Per-token loss ``[B, S]`` of ``batch`` from the last stage's hidden states, and the KD
    metrics (None for the LM loss alone, ``kd_weight`` None): the fused head
    (``loss.fused_head``), else the output layer's logits then the loss."""
    weight = gpt.output_weight()
    if cfg.fused_head:
        return head_loss(
            hidden_SBH, weight, batch, cfg, kd_weight, tp_group, validate,
            sequence_parallel=gpt.config.sequence_parallel,
        )  # fmt: skip
    # bf16 runs: megatron's Float16Module hands the last stage's output back in fp32.
    logits_SBV, _ = gpt.output_layer(hidden_SBH.to(weight.dtype), weight=weight)
    labels_BS = batch.tokens[:, 1:]
    if kd_weight is None:
        return gpt.compute_language_model_loss(labels_BS, logits_SBV), None
    out = kd_lm_loss(
        logits_SBV, batch.targets, labels_BS, cfg, tp_group,
        loss_mask=batch.mask, kd_weight=kd_weight, validate=validate,
    )  # fmt: skip
    return out.loss, out.metrics


class Objective:
    """``forward_step_func`` for megatron's schedules (one instance per engine).

    The engine sets ``kd_weight`` (α; None: LM loss only) and ``validate`` before each schedule
    call. Every chunk draws one micro-batch per call, so all chunks' iterators stay in step; a
    chunk that neither embeds tokens nor computes the loss ignores it (and during evaluation is
    handed empty ones).
    """

    def __init__(
        self, cfg: KDLossConfig, tp_group: dist.ProcessGroup | None, device: torch.device
    ) -> None:
        self.cfg, self.tp_group, self.device = cfg, tp_group, device
        self.kd_weight: float | None = None
        self.validate = False

    def __call__(
        self, data_iterator: Iterator[MicroBatch], model: torch.nn.Module
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
        batch = batch_to_device(next(data_iterator), self.device)
        pre_process = get_attr_wrapped_model(model, "pre_process")
        post_process = get_attr_wrapped_model(model, "post_process")
        output = model(batch.tokens[:, :-1] if pre_process else None, None, None)
        if not post_process:
            return output, _not_last_stage
        gpt = get_attr_wrapped_model(model, "output_weight", return_model_obj=True)
        loss_BS, metrics = student_loss(
            gpt, output, batch, self.cfg, self.kd_weight, self.tp_group, self.validate
        )
        return loss_BS, functools.partial(_reduce, metrics, batch.mask)


def _not_last_stage(output: torch.Tensor) -> tuple:
    raise AssertionError("megatron called the loss function on a stage without the loss")


def _reduce(
    metrics: dict[str, torch.Tensor] | None, mask_BS: torch.Tensor | None, loss_BS: torch.Tensor
) -> tuple:
    """``(loss sum, token count, {"sums": metric sums})`` for megatron's per-token loss mode."""
    total, tokens, sums = token_sums(loss_BS, mask_BS, metrics)
    return total, tokens.int(), {"sums": sums}
