"""Sparse targets from a vocabulary split over tensor ranks, never gathering the vocabulary.

A rank of a tensor-parallel teacher holds log-probs ``[S, V/T]`` for the ids of its
:class:`~kdscale.teacher.base.VocabShard`. :func:`sparsify_shard` is a collective over the
shard's group and returns, on every rank, the same targets :func:`~kdscale.cache.sparsify.sparsify`
makes from the whole row (up to float rounding of sums taken in another order):

- the row maximum is an all-reduce (max), so the temperature-scaled probabilities are the same
  numbers on every layout;
- ``topk``/``topp``: each rank's local top ``k`` (``max_k``) candidates, all-gathered (T·k
  values and global ids), give the global top ``k``; the mass outside the kept ids is summed
  per shard and all-reduced (exact tail, as on one rank);
- ``sampled`` (RS-KD): the same counter-based uniforms; an all-gather of the T shard masses gives
  each rank its offset in the global CDF, each rank resolves the draws that fall in its range
  (searchsorted on its local cumulative sum) and an all-reduce (max) of the ``[S, N]`` draw
  ids (−1 where unresolved) gives every rank all draws;
- ``k = "full"`` needs every id anyway: it all-gathers the distribution (O(V) per position).

Bytes sent per position and rank: 4 (max) + 12k (candidates) + 8 (tail) for ``topk``/``topp``;
4 + 8 (shard mass) + 8N (draws) for ``sampled`` (:func:`bytes_per_position`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from kdscale.cache.sparsify import drawn_targets, sample_uniforms, sparsify, top_targets
from kdscale.cache.targets import SparseTargets
from kdscale.config.cache import CodecConfig
from kdscale.errors import KDScaleError
from kdscale.teacher.base import VocabShard


def sparsify_shard(
    logp_SV: torch.Tensor, cfg: CodecConfig, shard: VocabShard, key: str = "", start: int = 0
) -> SparseTargets:
    """Sparse targets ``[1, S, K]`` of positions ``start ..`` of sample ``key`` from this rank's
    columns ``logp_SV`` ``[S, V/T]`` (collective over ``shard.group``; the same on every rank)."""
    if cfg.is_full(shard.vocab):  # every id is kept: the one layout that gathers the vocabulary
        return sparsify(_gather_columns(logp_SV, shard), cfg, key, start)
    x = logp_SV.float()
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    peak = x.max(-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=shard.group)
    if not torch.isfinite(peak).all():
        raise KDScaleError("sparsify: every position needs a finite largest logit")
    shifted = x - peak
    probs = torch.exp(shifted)
    if cfg.kind == "sampled":
        return _sampled_shard(probs, cfg, shard, key, start)
    return _top_shard(shifted, probs, cfg, shard)


def bytes_per_position(cfg: CodecConfig, vocab: int) -> int:
    """Bytes one rank sends per position in :func:`sparsify_shard` (all-gathers counted once)."""
    if cfg.is_full(vocab):
        return 4 * vocab
    if cfg.kind == "sampled":
        return 4 + 8 + 8 * cfg.draws
    return 4 + 12 * cfg.support(vocab) + 8


def _gather_columns(x_SV: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    parts = [torch.empty_like(x_SV) for _ in range(shard.size)]
    dist.all_gather(parts, x_SV.contiguous(), group=shard.group)
    return torch.cat(parts, dim=-1)


def _top_shard(
    shifted: torch.Tensor, probs: torch.Tensor, cfg: CodecConfig, shard: VocabShard
) -> SparseTargets:
    """Global ``topk``/``topp`` from T local candidate lists (``probs`` is overwritten)."""
    width = min(cfg.support(shard.vocab), shard.vocab)
    local_w = min(width, shifted.shape[1])
    values, ids = shifted.topk(local_w, dim=-1)
    values = _gather_columns(values, shard)
    ids = _gather_columns(ids + shard.offset, shard)
    values, pick = values.topk(width, dim=-1)
    ids = ids.gather(-1, pick)
    local = ids - shard.offset  # zero this rank's kept ids: what is left is the tail
    mine = (local >= 0) & (local < probs.shape[1])
    rows, cols = torch.nonzero(mine, as_tuple=True)
    probs[rows, local[rows, cols]] = 0.0
    outside = probs.sum(-1).double()
    dist.all_reduce(outside, group=shard.group)
    return top_targets(values, ids, values.exp().double(), outside, cfg)


def _sampled_shard(
    probs: torch.Tensor, cfg: CodecConfig, shard: VocabShard, key: str, start: int
) -> SparseTargets:
    """RS-KD draws by a vocab-parallel inverse CDF with the single-rank uniforms."""
    n_rows, width = probs.shape
    cdf = probs.cumsum(-1, dtype=torch.float64)
    masses = _gather_columns(cdf[:, -1:], shard)  # [S, T], in rank order on every rank
    ends = masses.cumsum(-1)
    rank = dist.get_rank(group=shard.group)
    u = sample_uniforms(key, cfg.seed, np.arange(start, start + n_rows), cfg.draws)
    target = torch.from_numpy(u).to(cdf.device) * ends[:, -1:]
    lo = ends[:, rank - 1 : rank] if rank else torch.full_like(ends[:, :1], -torch.inf)
    hi = ends[:, rank : rank + 1] if rank < shard.size - 1 else torch.full_like(lo, torch.inf)
    mine = (target >= lo) & (target < hi)
    local = torch.searchsorted(cdf, target - lo.clamp(min=0.0), right=True).clamp_(max=width - 1)
    drawn = torch.where(mine, local + shard.offset, -1)
    dist.all_reduce(drawn, op=dist.ReduceOp.MAX, group=shard.group)
    return drawn_targets(drawn)
