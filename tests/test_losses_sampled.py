"""Sampled targets (RS-KD) give an unbiased full-vocabulary forward-KL gradient; top-k does not.

Each of R replicates is one batch column with its own independent draw of N ids from the
teacher; the same student logits sit in every column, so one backward gives R independent
gradient estimates. Their mean must match the full forward-KL gradient ``q - p`` within the
standard error of the mean (max |z| < 5 over all S·V entries: under the null the chance of
exceeding it anywhere is ~5e-5; the seed is fixed, so the test is deterministic), while the
top-k gradient's bias is many standard errors large.
"""

from __future__ import annotations

import pytest
import torch

from kdscale.losses import KDLossConfig, kd_lm_loss
from tests.test_losses_reference import sampled_targets, teacher_distribution, topk_targets

SEQ, VOCAB, DRAWS, SLOTS, REPLICATES = 2, 40, 16, 16, 4000


def _per_replicate_grads(logits_SV: torch.Tensor, targets, cfg: KDLossConfig) -> torch.Tensor:
    """Gradient of each replicate's loss w.r.t. its own copy of the logits: ``[R, S, V]``."""
    leaf = logits_SV[:, None, :].expand(SEQ, REPLICATES, VOCAB).clone().requires_grad_()
    labels = torch.zeros(REPLICATES, SEQ, dtype=torch.long)
    out = kd_lm_loss(leaf, targets, labels, cfg)
    (grad,) = torch.autograd.grad(out.loss.sum(), leaf)
    return grad.transpose(0, 1)


@pytest.mark.parametrize("mode", ["tail", "zero"])
def test_sampled_gradient_is_unbiased_and_topk_is_not(mode: str) -> None:
    gen = torch.Generator().manual_seed(5)
    P_SV = teacher_distribution(1, SEQ, VOCAB, gen, spread=1.5)[0]
    logits_SV = torch.randn(SEQ, VOCAB, generator=gen, dtype=torch.float64)
    true_grad = torch.softmax(logits_SV, -1) - P_SV  # d KL(p ‖ softmax(z)) / dz
    P_RSV = P_SV.expand(REPLICATES, SEQ, VOCAB)
    cfg = KDLossConfig(missing_mass=mode)

    sampled = _per_replicate_grads(logits_SV, sampled_targets(P_RSV, DRAWS, SLOTS, gen), cfg)
    mean = sampled.mean(0)
    stderr = sampled.std(0) / REPLICATES**0.5
    assert (stderr > 0).all()
    z_scores = (mean - true_grad) / stderr
    assert z_scores.abs().max() < 5.0, z_scores.abs().max()
    # E‖mean − true‖² = ‖stderr‖²; with S·V = 80 terms the ratio concentrates near 1.
    assert (mean - true_grad).norm() < 1.5 * stderr.norm()

    topk = _per_replicate_grads(logits_SV, topk_targets(P_RSV, 4), cfg)[0]
    bias = (topk - true_grad).norm()
    assert bias > 20 * stderr.norm(), (bias, stderr.norm())
