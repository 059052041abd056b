"""The loss of one micro-batch from the student's final hidden states, output layer included.

Both engines call :func:`head_loss` when ``loss.fused_head`` is on (the default): the output
layer runs inside :func:`kdscale.losses.head_kd_lm_loss`, so no ``[tokens, V/TP]`` logits are
ever allocated, with or without a cache.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kdscale.config.loss import KDLossConfig
from kdscale.losses import head_kd_lm_loss
from kdscale.train.loader import MicroBatch


def head_loss(
    hidden_SBH: torch.Tensor,
    weight_VH: torch.Tensor,
    batch: MicroBatch,
    cfg: KDLossConfig,
    kd_weight: float | None,
    tp_group: dist.ProcessGroup | None,
    validate: bool,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Per-token loss ``[B, S]`` of ``batch`` and its KD metrics (None for the LM loss alone,
    ``kd_weight`` None), from ``hidden_SBH`` and this rank's output weight shard ``weight_VH``."""
    out = head_kd_lm_loss(
        hidden_SBH.to(weight_VH.dtype), weight_VH,
        None if kd_weight is None else batch.targets, batch.tokens[:, 1:], cfg, tp_group,
        loss_mask=batch.mask, kd_weight=kd_weight, validate=validate,
        sequence_parallel=sequence_parallel,
    )  # fmt: skip
    return out.loss, None if kd_weight is None else out.metrics
