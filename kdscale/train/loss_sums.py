"""Per-token losses → the token sums every micro-batch reports, whichever engine computed them.

Losses are sums over counted tokens; the engine divides the gradients by the tokens of the
whole global batch, so a step is the same whatever the layout and micro-batch split. Metrics
travel as token-weighted sums (:data:`SUMS`) until a log step divides them by ``tokens``.
"""

from __future__ import annotations

import torch

# Token-weighted sums every micro-batch reports (``tokens`` is the count of counted positions).
SUMS = ("tokens", "loss", "lm", "kd", "kl_teacher_tail", "covered_mass")
_KD_METRICS = ("loss", "lm", "kd", "kl_teacher_tail", "covered_mass")


def token_sums(
    loss_BS: torch.Tensor,
    mask_BS: torch.Tensor | None,
    kd_metrics: dict[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss sum, token count, SUMS vector)`` of one micro-batch's per-token loss ``[B, S]``.

    ``mask_BS`` (float, 0 = not counted) is applied here (``kd_lm_loss`` has applied it
    already, a plain cross-entropy has not); ``kd_metrics`` are ``kd_lm_loss``'s token means,
    None for the LM loss alone.
    """
    loss_BS = loss_BS.float()
    if mask_BS is None:
        tokens = torch.tensor(float(loss_BS.numel()), device=loss_BS.device)
    else:
        loss_BS = loss_BS * mask_BS
        tokens = mask_BS.sum()
    total = loss_BS.sum()
    with torch.no_grad():
        if kd_metrics is not None:
            values = [tokens] + [kd_metrics[name] * tokens for name in _KD_METRICS]
        else:
            zero = torch.zeros((), device=total.device)
            values = [tokens, total, total, zero, zero, zero]
        sums = torch.stack([v.detach().float().reshape(()) for v in values])
    return total, tokens, sums
