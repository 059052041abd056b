"""One micro-batch through the transformers student: the shared objective, token sums.

The loss is the megatron engine's, with no tensor parallelism. With ``loss.fused_head`` (the
default) the HF ``lm_head`` is replaced by a :class:`LossHead` holding the same weight, whose
forward computes :func:`kdscale.train.head_loss.head_loss` from the final hidden states: the
logits never exist, and ZeRO-3 gathers the weight for it as for any forward of ``lm_head``
(a module's partitioned weights are only present inside its own forward). Otherwise the
output layer's ``[S, B, V]`` logits (only the small hidden states are transposed, so the
logits are a fresh contiguous tensor whose storage ``kd_lm_loss`` may reuse) go to
:func:`kdscale.losses.kd_lm_loss`, or to the plain LM cross-entropy without a cache. Per-token
losses become sums in :func:`kdscale.train.loss_sums.token_sums`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdscale.config.loss import KDLossConfig
from kdscale.losses import kd_lm_loss
from kdscale.train.head_loss import head_loss
from kdscale.train.loader import MicroBatch
from kdscale.train.loss_sums import token_sums

Loss = tuple[torch.Tensor, dict[str, torch.Tensor] | None]


class LossHead(torch.nn.Linear):
    """A bias-free ``lm_head`` whose forward, given a micro-batch, returns the fused head's
    per-token loss and KD metrics; given hidden states alone, the logits as before."""

    @classmethod
    def sharing(cls, lm_head: torch.nn.Linear) -> "LossHead":
        """A LossHead with ``lm_head``'s weight (the same parameter: ties and names unchanged)."""
        if lm_head.bias is not None:
            raise ValueError("LossHead: the output layer has a bias")
        head = cls(lm_head.in_features, lm_head.out_features, bias=False, device="meta")
        head.weight = lm_head.weight
        return head

    def forward(  # type: ignore[override]
        self,
        hidden_SBH: torch.Tensor,
        batch: MicroBatch | None = None,
        cfg: KDLossConfig | None = None,
        kd_weight: float | None = None,
        validate: bool = False,
    ) -> torch.Tensor | Loss:
        if batch is None or cfg is None:
            return super().forward(hidden_SBH)
        return head_loss(hidden_SBH, self.weight, batch, cfg, kd_weight, None, validate)


class CausalLMWithLoss(torch.nn.Module):
    """A transformers causal LM (``.model`` backbone + ``.lm_head``, as Llama), wrapped as ``.lm``,
    whose forward returns a micro-batch's per-token loss ``[B, S]`` and KD metrics (None for the
    LM loss alone) computed in megatron's ``[S, B, ...]`` layout."""

    def __init__(self, lm: torch.nn.Module, cfg: KDLossConfig) -> None:
        super().__init__()
        self.lm, self.cfg = lm, cfg
        if cfg.fused_head:
            lm.lm_head = LossHead.sharing(lm.lm_head)

    def forward(self, batch: MicroBatch, kd_weight: float | None, validate: bool) -> Loss:
        hidden_BSH = self.lm.model(input_ids=batch.tokens[:, :-1], use_cache=False)
        hidden_SBH = hidden_BSH.last_hidden_state.transpose(0, 1)
        if self.cfg.fused_head:
            return self.lm.lm_head(hidden_SBH, batch, self.cfg, kd_weight, validate)
        return _logits_loss(self.lm.lm_head(hidden_SBH), batch, self.cfg, kd_weight, validate)


def _logits_loss(
    logits_SBV: torch.Tensor,
    batch: MicroBatch,
    cfg: KDLossConfig,
    kd_weight: float | None,
    validate: bool,
) -> Loss:
    labels_BS = batch.tokens[:, 1:]
    if kd_weight is None:
        loss_SB = F.cross_entropy(
            logits_SBV.float().flatten(0, 1), labels_BS.t().flatten(), reduction="none"
        )
        return loss_SB.view(labels_BS.t().shape).t(), None
    out = kd_lm_loss(
        logits_SBV, batch.targets, labels_BS, cfg, None,
        loss_mask=batch.mask, kd_weight=kd_weight, validate=validate,
    )  # fmt: skip
    return out.loss, out.metrics


def micro_batch_loss(
    model: torch.nn.Module, batch: MicroBatch, kd_weight: float | None, validate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss sum, counted tokens, SUMS vector)`` of ``batch`` through ``model`` (an
    :class:`CausalLMWithLoss`, or the engine wrapping one); ``kd_weight`` None trains on the labels
    alone (no cache); ``validate`` checks the loss inputs' values (a host sync)."""
    loss_BS, metrics = model(batch, kd_weight, validate)
    return token_sums(loss_BS, batch.mask, metrics)
