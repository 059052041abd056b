"""A dense float64 reference for ``kd_lm_loss``, written independently of kdscale.losses.

It works on the FULL teacher distribution ``P [B, S, V]`` and a boolean support mask over the
vocabulary (no gathered slots, no tail bookkeeping, no vocab-parallel tricks), so agreement with
the sparse fused implementation is evidence, not tautology. The helpers that turn ``P`` into
``SparseTargets`` (top-k, top-p with empty slots, sampled counts) live here too; the tests at
the bottom check the reference itself against textbook identities.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdscale.cache.targets import SparseTargets


def teacher_distribution(
    batch: int, seq: int, vocab: int, gen: torch.Generator, spread: float = 2.0
):
    """A random full teacher distribution ``P [B, S, V]`` (float64, every entry > 0)."""
    return torch.softmax(
        spread * torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64), -1
    )


def support_mask(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool ``[B, S, V]``: which vocab ids a position's support lists (empty slots, -1, none)."""
    spill = torch.where(ids >= 0, ids, vocab)  # empty slots land in an extra column, dropped
    mask = torch.zeros(*ids.shape[:2], vocab + 1, dtype=torch.bool)
    return mask.scatter_(-1, spill, True)[..., :vocab]


def _tail_logp(P: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.where(support_mask(ids, P.shape[-1]), 0.0, P).sum(-1).log()


def topk_targets(P: torch.Tensor, k: int, dtype: torch.dtype = torch.float64) -> SparseTargets:
    """Top-``k`` teacher ids with exact log-probs and the exact log tail mass."""
    top = P.topk(k, -1)
    tail = _tail_logp(P, top.indices) if k < P.shape[-1] else torch.full(P.shape[:2], -math.inf)
    return SparseTargets(top.indices, top.values.log().to(dtype), tail.to(dtype), "topk")


def ragged_targets(P: torch.Tensor, k: int, gen: torch.Generator) -> SparseTargets:
    """Top-``k_pos`` with ``1 <= k_pos <= k`` per position, padded with empty slots (like top-p)."""
    top = topk_targets(P, k)
    keep = torch.randint(1, k + 1, P.shape[:2], generator=gen)
    empty = torch.arange(k) >= keep[..., None]
    ids = top.ids.masked_fill(empty, -1)
    return SparseTargets(ids, top.logp.masked_fill(empty, -math.inf), _tail_logp(P, ids), "topp")


def sampled_targets(P: torch.Tensor, draws: int, slots: int, gen: torch.Generator) -> SparseTargets:
    """``draws`` ids per position with replacement from ``P``; logp = log(count / draws)."""
    batch, seq, vocab = P.shape
    picks = torch.multinomial(P.reshape(-1, vocab), draws, replacement=True, generator=gen)
    counts = torch.zeros(batch * seq, vocab, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=torch.float64)
    )
    assert ((counts > 0).sum(1) <= slots).all(), "slots must hold every distinct draw"
    top = counts.topk(slots, -1)
    ids = top.indices.masked_fill(top.values == 0, -1)
    logp = (top.values / draws).log()
    shape = (batch, seq, slots)
    return SparseTargets(
        ids.reshape(shape), logp.reshape(shape), torch.full((batch, seq), -math.inf, dtype=torch.float64),
        "sampled",
    )  # fmt: skip


def _pointwise(name: str, p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence's summand at one bucket; buckets where p = q = 0 contribute 0."""
    both_zero = (p == 0) & (q == 0)
    p, q = p.masked_fill(both_zero, 1.0), q.masked_fill(both_zero, 1.0)
    if name == "fkl":
        term = torch.where(p > 0, p * torch.log(p / q), 0.0)
    elif name == "rkl":
        term = torch.where(q > 0, q * torch.log(q / p), 0.0)
    elif name == "jsd":
        m = beta * p + (1 - beta) * q
        term = beta * torch.where(p > 0, p * torch.log(p / m), 0.0) + (1 - beta) * torch.where(
            q > 0, q * torch.log(q / m), 0.0
        )
    else:
        term = 0.5 * (p - q).abs()
    return term.masked_fill(both_zero, 0.0)


def reference_loss(
    logits_SBV: torch.Tensor,
    P: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str,
    missing_mass: str,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    jsd_beta: float = 0.5,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ``[B, S]`` total from the dense teacher ``P`` and the support ``ids`` (-1 empty)."""
    z = logits_SBV.transpose(0, 1).to(torch.float64)
    Q = torch.softmax(z / temperature, -1)
    support = support_mask(ids, P.shape[-1])
    if missing_mass == "renorm":
        P = torch.where(support, P, 0.0) / torch.where(support, P, 0.0).sum(-1, keepdim=True)
        Q = torch.where(support, Q, 0.0) / torch.where(support, Q, 0.0).sum(-1, keepdim=True)
    terms = torch.where(support, _pointwise(divergence, P, Q, jsd_beta), 0.0)
    kd = terms.sum(-1)
    if missing_mass == "tail":
        p_tail = torch.where(support, 0.0, P).sum(-1)
        q_tail = torch.where(support, 0.0, Q).sum(-1)
        kd = kd + _pointwise(divergence, p_tail, q_tail, jsd_beta)
    kd = temperature**2 * kd
    log_softmax = torch.log_softmax(z, -1)
    valid = labels != -100
    lm = -log_softmax.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    weight = valid.to(torch.float64) * (1.0 if loss_mask is None else loss_mask.to(torch.float64))
    total = kd_weight * kd + (1 - kd_weight) * lm
    return torch.where(weight > 0, weight * total, 0.0)


# ---- the reference against textbook identities --------------------------------------------


def test_reference_full_support_tail_is_full_kl() -> None:
    gen = torch.Generator().manual_seed(1)
    P = teacher_distribution(2, 3, 9, gen)
    z = torch.randn(3, 2, 9, generator=gen, dtype=torch.float64)
    ids = torch.arange(9).expand(2, 3, 9)
    labels = torch.zeros(2, 3, dtype=torch.long)
    got = reference_loss(z, P, ids, labels, divergence="fkl", missing_mass="tail")
    Q = torch.softmax(z.transpose(0, 1), -1)
    torch.testing.assert_close(got, (P * (P / Q).log()).sum(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_reference_is_zero_when_student_equals_teacher(divergence: str) -> None:
    gen = torch.Generator().manual_seed(2)
    P = teacher_distribution(2, 3, 9, gen)
    z = P.log().transpose(0, 1) + 3.0  # softmax-invariant shift
    top = topk_targets(P, 4)
    labels = torch.zeros(2, 3, dtype=torch.long)
    for mode in ("tail", "renorm", "zero"):
        got = reference_loss(z, P, top.ids, labels, divergence=divergence, missing_mass=mode)
        assert got.abs().max() < 1e-12, (mode, got)


def test_reference_jsd_and_tvd_bounds() -> None:
    gen = torch.Generator().manual_seed(3)
    P = teacher_distribution(4, 5, 7, gen, spread=4.0)
    z = 4.0 * torch.randn(5, 4, 7, generator=gen, dtype=torch.float64)
    top = topk_targets(P, 3)
    labels = torch.zeros(4, 5, dtype=torch.long)
    jsd = reference_loss(z, P, top.ids, labels, divergence="jsd", missing_mass="tail")
    tvd = reference_loss(z, P, top.ids, labels, divergence="tvd", missing_mass="tail")
    assert (jsd >= 0).all() and (jsd <= math.log(2) + 1e-12).all()
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-12).all()
