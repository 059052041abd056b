"""How faithful sparse targets are to the teacher (statistics recorded in the cache manifest).

A sparse target implies a full distribution over the vocabulary: its kept ids carry
``exp(logp)`` and the tail mass is spread uniformly over the ``V - n`` other ids. For
``sampled`` targets the tail is empty, so the implied distribution is zero off the sampled
support and the forward KL is infinite; the total variation distance is finite for all kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdscale.cache.targets import SparseTargets

_ROW_BLOCK_ELEMENTS = 1 << 22


@dataclass
class PositionFidelity:
    """Per-position statistics, float64 ``[S]``.

    Attributes:
        covered_mass: the teacher's true probability mass on the kept ids.
        kl: KL(teacher ‖ implied distribution) in nats (``inf`` where mass is dropped).
        tv: total variation distance between teacher and implied distribution.
    """

    covered_mass: torch.Tensor
    kl: torch.Tensor
    tv: torch.Tensor


def fidelity(
    logits_SV: torch.Tensor, targets: SparseTargets, temperature: float
) -> PositionFidelity:
    """Compare targets ``[1, S, K]`` with the teacher's logits ``[S, V]`` for the same positions."""
    if targets.shape[0] != 1 or targets.shape[1] != logits_SV.shape[0]:
        raise ValueError(
            f"fidelity: targets {tuple(targets.shape)} do not match logits {tuple(logits_SV.shape)}"
        )
    vocab = logits_SV.shape[1]
    rows = max(1, _ROW_BLOCK_ELEMENTS // vocab)
    parts: list[tuple[torch.Tensor, ...]] = []
    for r0 in range(0, logits_SV.shape[0], rows):
        block = targets.narrow(1, r0, min(rows, logits_SV.shape[0] - r0))
        logp = torch.log_softmax(logits_SV[r0 : r0 + rows].double() / temperature, dim=-1)
        parts.append(_block_fidelity(logp, block))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64)
        return PositionFidelity(empty, empty.clone(), empty.clone())
    covered, kl, tv = (torch.cat(column) for column in zip(*parts))
    return PositionFidelity(covered, kl, tv)


def _block_fidelity(logp: torch.Tensor, targets: SparseTargets) -> tuple[torch.Tensor, ...]:
    ids, valid = targets.ids[0].to(logp.device), targets.valid[0].to(logp.device)
    n_rows, vocab = logp.shape
    probs = logp.exp()
    covered = (probs.gather(-1, ids.clamp(min=0)) * valid).sum(-1)
    rest = vocab - valid.sum(-1)
    spread = torch.where(
        rest > 0, targets.tail_logp[0].double().to(logp.device) - rest.double().log(), -torch.inf
    )
    implied = spread[:, None].expand(n_rows, vocab).clone()
    row_of = torch.arange(n_rows, device=logp.device)[:, None].expand_as(ids)
    implied[row_of[valid], ids[valid]] = targets.logp[0].double().to(logp.device)[valid]
    kl = torch.where(probs > 0, probs * (logp - implied), 0.0).sum(-1)
    tv = 0.5 * (probs - implied.exp()).abs().sum(-1)
    return covered.cpu(), kl.cpu(), tv.cpu()


def support_kl(reference: SparseTargets, approx: SparseTargets) -> torch.Tensor:
    """KL(reference ‖ approx) ``[B, S]`` over the reference's kept ids plus its tail bucket.

    ``approx`` must keep the same ids per position (in any order), e.g. the decoded form of
    ``reference``; this is the error the value quantization alone introduces.
    """
    if reference.shape[:2] != approx.shape[:2]:
        raise ValueError("support_kl: reference and approx cover different positions")
    ref_ids, ref_valid = reference.ids, reference.valid
    # For each reference slot, the approx slot holding the same id.
    match = (ref_ids[..., :, None] == approx.ids[..., None, :]) & ref_valid[..., None]
    if not torch.equal(match.sum(-1), ref_valid.long()) or not torch.equal(
        ref_valid.sum(-1), approx.valid.sum(-1)
    ):
        raise ValueError("support_kl: approx does not keep exactly the reference's ids")
    approx_logp = (match * approx.logp.double()[..., None, :].nan_to_num(neginf=0.0)).sum(-1)
    ref_logp = reference.logp.double()
    terms = torch.where(ref_valid, ref_logp.exp() * (ref_logp - approx_logp), 0.0).sum(-1)
    ref_tail, approx_tail = reference.tail_logp.double(), approx.tail_logp.double()
    tail_term = torch.where(
        torch.isneginf(ref_tail), 0.0, ref_tail.exp() * (ref_tail - approx_tail)
    )
    return terms + tail_term
