"""Divergences between teacher and student on the teacher's support, as log-prob buckets.

Both distributions are reduced to the same buckets per token (:func:`support_buckets`):

- ``tail``:   the K support ids plus one bucket for everything else (teacher ``tail_logp``,
  student ``log(1 - Σ q)`` computed directly);
- ``renorm``: the K support ids, each side renormalised to sum to one over them;
- ``zero``:   the K support ids, student probabilities over the full vocabulary, no tail term
  (the sums below run over the support only, so e.g. ``fkl`` is the support's part of KL).

Every function here is plain differentiable torch on small ``[N, K(+1)]`` tensors; gradients
reach the logits through :mod:`kdscale.losses.vocab_parallel`. A bucket is "live" when its slot
is valid and at least one side has mass; dead buckets are zeroed *before* any arithmetic so
their gradients are exact zeros, never ``0 · NaN``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

NEG_INF = float("-inf")


class Buckets(NamedTuple):
    """Teacher and student log-probs per bucket ``[N, K']`` and which buckets are live."""

    logp: torch.Tensor
    logq: torch.Tensor
    live: torch.Tensor


def _log_normalise(x_NK: torch.Tensor, valid_NK: torch.Tensor) -> torch.Tensor:
    """``x - logsumexp(x over valid slots)``; rows with no valid slot are left finite."""
    has_any = valid_NK.any(1, keepdim=True)
    safe = x_NK.masked_fill(~valid_NK, NEG_INF).masked_fill(~has_any, 0.0)
    return x_NK - torch.logsumexp(safe, 1, keepdim=True)


def support_buckets(
    missing_mass: str,
    t_logp_NK: torch.Tensor,
    t_tail_N: torch.Tensor,
    s_logq_NK: torch.Tensor,
    s_tail_N: torch.Tensor,
    valid_NK: torch.Tensor,
    token_N: torch.Tensor,
) -> Buckets:
    """The buckets of ``missing_mass`` (tail | renorm | zero); ``token_N`` marks counted rows."""
    valid_NK = valid_NK & token_N[:, None]
    if missing_mass == "tail":
        logp = torch.cat([t_logp_NK, t_tail_N[:, None]], 1)
        logq = torch.cat([s_logq_NK, s_tail_N[:, None]], 1)
        mask = torch.cat([valid_NK, token_N[:, None]], 1)
    elif missing_mass == "renorm":
        logp, logq = _log_normalise(t_logp_NK, valid_NK), _log_normalise(s_logq_NK, valid_NK)
        mask = valid_NK
    elif missing_mass == "zero":
        logp, logq, mask = t_logp_NK, s_logq_NK, valid_NK
    else:
        raise ValueError(f"missing_mass={missing_mass!r}; allowed: tail, renorm, zero")
    live = mask & ((logp > NEG_INF) | (logq > NEG_INF))
    return Buckets(logp.masked_fill(~live, 0.0), logq.masked_fill(~live, 0.0), live)


def _xlogratio(log_w: torch.Tensor, log_v: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Per bucket ``w · (log w - log v)``, 0 where ``w = 0`` (and +inf where only ``v = 0``)."""
    keep = live & (log_w > NEG_INF)
    log_w, log_v = log_w.masked_fill(~keep, 0.0), log_v.masked_fill(~keep, 0.0)
    return torch.where(keep, log_w.exp() * (log_w - log_v), 0.0)


def forward_kl(b: Buckets) -> torch.Tensor:
    """``Σ p (log p - log q)`` per row ``[N]``."""
    return _xlogratio(b.logp, b.logq, b.live).sum(1)


def reverse_kl(b: Buckets) -> torch.Tensor:
    """``Σ q (log q - log p)`` per row ``[N]``."""
    return _xlogratio(b.logq, b.logp, b.live).sum(1)


def jensen_shannon(b: Buckets, beta: float) -> torch.Tensor:
    """``β·KL(p‖m) + (1-β)·KL(q‖m)`` with ``m = β p + (1-β) q``, per row ``[N]``."""
    log_m = torch.logaddexp(b.logp + math.log(beta), b.logq + math.log1p(-beta))
    return beta * _xlogratio(b.logp, log_m, b.live).sum(1) + (1.0 - beta) * _xlogratio(
        b.logq, log_m, b.live
    ).sum(1)


def total_variation(b: Buckets) -> torch.Tensor:
    """``½ Σ |p - q|`` per row ``[N]``."""
    diff = (b.logp.exp() - b.logq.exp()).abs()
    return 0.5 * torch.where(b.live, diff, 0.0).sum(1)


def divergence(name: str, b: Buckets, jsd_beta: float = 0.5) -> torch.Tensor:
    """The divergence ``name`` (fkl | rkl | jsd | tvd) per row ``[N]``."""
    if name == "fkl":
        return forward_kl(b)
    if name == "rkl":
        return reverse_kl(b)
    if name == "jsd":
        return jensen_shannon(b, jsd_beta)
    if name == "tvd":
        return total_variation(b)
    raise ValueError(f"divergence={name!r}; allowed: fkl, rkl, jsd, tvd")


def teacher_tail_kl(
    buckets: Buckets,
    missing_mass: str,
    t_logp_NK: torch.Tensor,
    t_tail_N: torch.Tensor,
    s_logq_NK: torch.Tensor,
    s_tail_N: torch.Tensor,
    valid_NK: torch.Tensor,
    token_N: torch.Tensor,
) -> torch.Tensor:
    """``KL(teacher ‖ student)`` per row ``[N]`` on the teacher's cached distribution, tail
    included: the K cached ids plus one bucket for the rest of the vocabulary, whatever
    ``missing_mass`` the loss uses (``buckets`` are the loss's, reused when they are these).

    One definition for every run, so runs trained with different objectives compare; by the
    log-sum inequality it is a lower bound of the full-vocabulary KL (equal to it when the
    student's distribution is proportional to the teacher's inside the tail).
    """
    if missing_mass != "tail":
        buckets = support_buckets(
            "tail", t_logp_NK, t_tail_N, s_logq_NK, s_tail_N, valid_NK, token_N
        )
    return forward_kl(buckets)
