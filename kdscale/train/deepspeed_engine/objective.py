"""One micro-batch through the transformers student: logits, the shared objective, token sums.

The loss is the megatron engine's: :func:`kdscale.losses.kd_lm_loss` on logits in megatron's
``[S, B, V]`` layout (TP=1: no process group), or the plain LM cross-entropy without a cache;
both per token, turned into sums by :func:`kdscale.train.loss_sums.token_sums`.
:class:`SBVCausalLM` computes the output layer in that layout (only the small hidden states are
transposed), so the logits are a fresh contiguous tensor whose storage ``kd_lm_loss`` may reuse,
exactly as on the megatron path; the vocabulary-sized tensors are never copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdscale.config.loss import KDLossConfig
from kdscale.losses import kd_lm_loss
from kdscale.train.loader import MicroBatch
from kdscale.train.loss_sums import token_sums


class SBVCausalLM(torch.nn.Module):
    """A transformers causal LM (``.model`` backbone + ``.lm_head``, as Llama) whose forward
    returns ``[S, B, V]`` logits for ``[B, S]`` input ids. The wrapped model is ``.lm``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """Logits ``[S, B, V]``."""
        hidden_BSH = self.lm.model(input_ids=input_ids_BS, use_cache=False).last_hidden_state
        return self.lm.lm_head(hidden_BSH.transpose(0, 1))


def micro_batch_loss(
    model: torch.nn.Module,
    batch: MicroBatch,
    loss: KDLossConfig,
    kd_weight: float | None,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss sum, counted tokens, SUMS vector)`` of ``batch`` through ``model`` (an
    :class:`SBVCausalLM`, or the engine wrapping one); ``kd_weight`` None trains on the labels
    alone (no cache); ``validate`` checks the loss inputs' values (a host sync)."""
    labels_BS = batch.tokens[:, 1:]
    logits_SBV = model(batch.tokens[:, :-1])
    if kd_weight is None:
        loss_SB = F.cross_entropy(
            logits_SBV.float().flatten(0, 1), labels_BS.t().flatten(), reduction="none"
        )
        return token_sums(loss_SB.view(labels_BS.t().shape).t(), batch.mask, None)
    out = kd_lm_loss(
        logits_SBV, batch.targets, labels_BS, loss, None,
        loss_mask=batch.mask, kd_weight=kd_weight, validate=validate,
    )  # fmt: skip
    return token_sums(out.loss, batch.mask, out.metrics)
