"""How faithful sparse targets are to the teacher (statistics recorded in the cache manifest).

A sparse target implies a full distribution over the vocabulary: its kept ids carry
``exp(logp)`` and the tail mass is spread uniformly over the ``V - n`` other ids. For
``sampled`` targets the tail is empty, so the implied distribution is zero off the sampled
support and the forward KL is infinite; the total variation distance is finite for all kinds.

Both comparisons are O(K log K) or better per position and O(K) in memory beyond the teacher's
own row block: KL and TV of the implied distribution are closed forms in the kept entries, the
tail and row reductions of the teacher's block (no ``[rows, V]`` implied distribution is built),
and :func:`support_kl` matches ids by sorting both supports (no ``[K, K]`` comparison).

With a :class:`~kdscale.teacher.base.VocabShard` the teacher's block is one tensor rank's
columns: the normalizer, the kept entries (each on exactly one rank) and the row sums over the
rest are all-reduced over the shard's group, O(K) per position; the vocabulary is never gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdscale.cache.targets import EMPTY_ID, SparseTargets
from kdscale.teacher.base import VocabShard

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
    logits_SV: torch.Tensor, targets: SparseTargets, temperature: float, shard: VocabShard | None = None
) -> PositionFidelity:
    """Compare targets ``[1, S, K]`` with the teacher's logits ``[S, V]`` for the same positions
    (``[S, V/T]``, this rank's columns of ``shard``: collective over its group)."""
    if targets.shape[0] != 1 or targets.shape[1] != logits_SV.shape[0]:
        raise ValueError(
            f"fidelity: targets {tuple(targets.shape)} do not match logits {tuple(logits_SV.shape)}"
        )
    vocab = logits_SV.shape[1]
    rows = max(1, _ROW_BLOCK_ELEMENTS // vocab)
    parts: list[tuple[torch.Tensor, ...]] = []
    for r0 in range(0, logits_SV.shape[0], rows):
        block = targets.narrow(1, r0, min(rows, logits_SV.shape[0] - r0))
        x = logits_SV[r0 : r0 + rows].double() / temperature
        logp = torch.log_softmax(x, dim=-1) if shard is None else _log_softmax_shard(x, shard)
        parts.append(_block_fidelity(logp, block, shard))
    if not parts:
        empty = torch.zeros(0, dtype=torch.float64)
        return PositionFidelity(empty, empty.clone(), empty.clone())
    covered, kl, tv = (torch.cat(column) for column in zip(*parts))
    return PositionFidelity(covered, kl, tv)


def _log_softmax_shard(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """log-softmax over the whole vocabulary of this rank's columns ``x`` (float64)."""
    peak = x.max(-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=shard.group)
    total = (x - peak).exp().sum(-1, keepdim=True)
    dist.all_reduce(total, group=shard.group)
    return x - peak - total.log()


def _block_fidelity(
    logp: torch.Tensor, targets: SparseTargets, shard: VocabShard | None = None
) -> tuple[torch.Tensor, ...]:
    """Covered mass, KL and TV of one row block; ``logp`` float64 ``[rows, V]`` (a shard's
    columns ``[rows, V/T]``) is overwritten.

    With ``u`` the implied probability of each of the ``m = V - n`` ids outside the support
    (tail / m) and sums over them written as whole-row sums of the teacher's block with the
    kept entries zeroed: KL = Σ_kept p (log p - log q) + Σ_rest p log p - (Σ_rest p) log u and
    TV = (Σ_kept |p - q| + Σ_rest |p - u|) / 2.
    """
    ids, valid = targets.ids[0].to(logp.device), targets.valid[0].to(logp.device)
    width = logp.shape[1]
    vocab = width if shard is None else shard.vocab
    local = ids - (0 if shard is None else shard.offset)
    mine = valid & (local >= 0) & (local < width)  # the kept ids among these columns
    q = targets.logp[0].double().to(logp.device)
    p_kept = torch.where(mine, logp.gather(-1, local.clamp(0, width - 1)), -torch.inf)
    if shard is not None:  # each kept id lives on exactly one rank
        dist.all_reduce(p_kept, op=dist.ReduceOp.MAX, group=shard.group)
    kept_kl = torch.where(valid & (p_kept > -torch.inf), p_kept.exp() * (p_kept - q), 0.0).sum(-1)
    kept_tv = torch.where(valid, (p_kept.exp() - q.exp()).abs(), 0.0).sum(-1)
    covered = torch.where(valid, p_kept.exp(), 0.0).sum(-1)
    rest = vocab - valid.sum(-1)
    log_u = torch.where(
        rest > 0, targets.tail_logp[0].double().to(logp.device) - rest.double().log(), -torch.inf
    )
    probs = logp.exp()
    rows, cols = torch.nonzero(mine, as_tuple=True)
    probs[rows, local[rows, cols]] = 0.0  # zero the kept entries
    logp.clamp_(min=torch.finfo(logp.dtype).min)  # p log p = 0 where p = 0 (no 0 * -inf)
    # Σ_rest |p - u| = Σ_row |p' - u| - n u, where p' (the zeroed block) is 0 on the n kept ids.
    u = log_u.exp()
    sums = torch.stack([
        probs.sum(-1),
        torch.bmm(probs[:, None, :], logp[:, :, None]).flatten(),
        (probs - u[:, None]).abs_().sum(-1),
    ])  # fmt: skip
    if shard is not None:
        dist.all_reduce(sums, group=shard.group)
    rest_mass, rest_plogp, row_tv = sums
    rest_kl = torch.where(rest_mass > 0, rest_plogp - rest_mass * log_u, 0.0)
    rest_tv = row_tv - (vocab - rest) * u
    return covered.cpu(), (kept_kl + rest_kl).cpu(), (0.5 * (kept_tv + rest_tv)).cpu()


def support_kl(reference: SparseTargets, approx: SparseTargets) -> torch.Tensor:
    """KL(reference ‖ approx) ``[B, S]`` over the reference's kept ids plus its tail bucket.

    ``approx`` must keep the same ids per position (in any order), e.g. the decoded form of
    ``reference``; this is the error the value quantization alone introduces. Both supports
    are sorted by id and compared slot by slot, in blocks of positions.
    """
    if reference.shape[:2] != approx.shape[:2]:
        raise ValueError("support_kl: reference and approx cover different positions")
    width = max(reference.shape[2], approx.shape[2], 1)
    ref_ids, ref_logp = _rows(reference, width)
    app_ids, app_logp = _rows(approx, width)
    terms = torch.empty(ref_ids.shape[0], dtype=torch.float64)
    step = max(1, _ROW_BLOCK_ELEMENTS // width)
    for r0 in range(0, ref_ids.shape[0], step):
        ref_sorted, ref = _by_id(ref_ids[r0 : r0 + step], ref_logp[r0 : r0 + step])
        app_sorted, app = _by_id(app_ids[r0 : r0 + step], app_logp[r0 : r0 + step])
        if not torch.equal(ref_sorted, app_sorted):
            raise ValueError("support_kl: approx does not keep exactly the reference's ids")
        terms[r0 : r0 + step] = torch.where(ref_sorted >= 0, ref.exp() * (ref - app), 0.0).sum(-1)
    ref_tail, approx_tail = reference.tail_logp.double(), approx.tail_logp.double()
    tail_term = torch.where(
        torch.isneginf(ref_tail), 0.0, ref_tail.exp() * (ref_tail - approx_tail)
    )
    return terms.view(reference.shape[:2]) + tail_term


def _by_id(ids: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by id (empty slots first), log-probs in float64; sorted rows (the full
    layout's id order) skip the sort."""
    if ids.shape[1] > 1 and not bool((ids[:, 1:] >= ids[:, :-1]).all()):
        ids, order = ids.sort(-1)
        logp = logp.gather(-1, order)
    return ids, logp.double()


def _rows(targets: SparseTargets, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and log-probs as ``[B * S, width]``, padded with empty slots on the left."""
    ids, logp, extra = targets.ids, targets.logp, (width - targets.shape[2], 0)
    if extra[0]:
        ids = torch.nn.functional.pad(ids, extra, value=EMPTY_ID)
        logp = torch.nn.functional.pad(logp, extra, value=-torch.inf)
    return ids.reshape(-1, width), logp.reshape(-1, width)
