"""Teacher logits → sparse targets for one sample (``topk``, ``topp`` or ``sampled``).

:func:`sparsify` takes one block of positions ``[S, V]`` of one sample (any block of the
teacher's chunked output; ``start`` is the block's first position) and returns a
:class:`~kdscale.cache.targets.SparseTargets` with ``B = 1``. Blocks join with
:func:`concat_positions`. The result depends only on each row's logits, the config, the
sample key and the absolute position, never on how the positions were chunked:

- ``sampled`` draws ``N`` ids per position by inverse-CDF sampling with uniforms from a
  counter-based generator (SplitMix64 of ``hash(seed, key)`` + ``position * N + draw``), and
  keeps the distinct ids with ``logp = log(count / N)`` (``tail_logp = -inf``).
- ``topk``/``topp`` keep ids in descending probability with the exact tail mass; ``topk`` with
  ``k = V`` (full) keeps every id in id order (slot ``j`` = id ``j``, empty where the logit is
  ``-inf``), which needs no sort.

Work proceeds in row blocks of at most ~4M vocabulary entries on the logits' device:
probabilities in float32, their sums and the sampling CDF in float64. A teacher whose
vocabulary is split over tensor ranks is sparsified by :mod:`kdscale.cache.vocab_parallel`
from the same pieces (:func:`top_targets`, :func:`drawn_targets`, :func:`sample_uniforms`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdscale.cache.targets import EMPTY_ID, SparseTargets, TargetKind
from kdscale.config.cache import CodecConfig
from kdscale.errors import KDScaleError

_ROW_BLOCK_ELEMENTS = 1 << 22
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def sparsify(
    logits_SV: torch.Tensor, cfg: CodecConfig, key: str = "", start: int = 0
) -> SparseTargets:
    """Sparse targets ``[1, S, K]`` for positions ``start .. start + S`` of sample ``key``."""
    if logits_SV.dim() != 2:
        raise KDScaleError(f"sparsify: logits must be [S, V], got {tuple(logits_SV.shape)}")
    vocab = logits_SV.shape[1]
    support = cfg.support(vocab)
    rows = max(1, _ROW_BLOCK_ELEMENTS // max(vocab, 1))
    parts = []
    full = None
    if cfg.kind == "topk" and support == vocab:  # every id: filled in place, no topk
        full = _full_targets(logits_SV.shape[0], vocab)
    for r0 in range(0, logits_SV.shape[0], rows):
        x = logits_SV[r0 : r0 + rows].float()
        if cfg.temperature != 1.0:
            x = x / cfg.temperature
        peak = x.max(-1, keepdim=True).values
        if not torch.isfinite(peak).all():
            raise KDScaleError("sparsify: every position needs a finite largest logit")
        shifted = x - peak
        probs = torch.exp(shifted)  # unnormalized, in [0, 1]
        if cfg.kind == "sampled":
            parts.append(_sampled(probs, cfg, key, start + r0))
        elif full is not None:
            _fill_full(shifted, probs, full.narrow(1, r0, shifted.shape[0]))
        else:
            parts.append(_top(shifted, probs, cfg, support))
    if full is not None:
        return full
    if not parts:
        return _empty(cfg.kind)
    return concat_positions(parts)


def _empty(kind: TargetKind) -> SparseTargets:
    return SparseTargets(
        torch.zeros(1, 0, 0, dtype=torch.int64),
        torch.zeros(1, 0, 0, dtype=torch.float32),
        torch.zeros(1, 0, dtype=torch.float32),
        kind,
    )


def _full_targets(n_rows: int, vocab: int) -> SparseTargets:
    """Room for full targets ``[1, S, V]`` (filled block by block; no tail: all mass is kept)."""
    return SparseTargets(
        torch.empty(1, n_rows, vocab, dtype=torch.int64),
        torch.empty(1, n_rows, vocab, dtype=torch.float32),
        torch.full((1, n_rows), float("-inf")),
        "topk",
    )


def _fill_full(shifted: torch.Tensor, probs: torch.Tensor, out: SparseTargets) -> None:
    """Every id of one row block in id order, written into ``out``: ``shifted`` = logits - max,
    ``probs`` = its exp."""
    log_total = probs.sum(-1, dtype=torch.float64).log()
    out.logp[0].copy_(shifted.double() - log_total[:, None])
    out.ids[0].copy_(torch.arange(shifted.shape[1], device=shifted.device).expand_as(shifted))
    out.ids[0].masked_fill_(torch.isneginf(shifted).cpu(), EMPTY_ID)


def _top(
    shifted: torch.Tensor, probs: torch.Tensor, cfg: CodecConfig, support: int
) -> SparseTargets:
    """``topk``/``topp`` of one row block: ``shifted`` = logits - max, ``probs`` = its exp.

    The mass outside the kept ids is summed directly (not as ``1 - kept``), so the tail stays
    accurate when the kept mass is close to one. ``probs`` is overwritten.
    """
    width = min(support, shifted.shape[1])
    values, ids = shifted.topk(width, dim=-1)
    kept = probs.gather(-1, ids).double()
    outside = probs.scatter_(-1, ids, 0.0).sum(-1).double()
    return top_targets(values, ids, kept, outside, cfg)


def top_targets(
    values: torch.Tensor, ids: torch.Tensor, kept: torch.Tensor, outside: torch.Tensor, cfg: CodecConfig
) -> SparseTargets:
    """``topk``/``topp`` targets from the candidates ``[rows, width]`` in descending order:
    ``values`` (logit - max), global ``ids``, their unnormalized probabilities ``kept``
    (float64) and the summed mass of every other id ``outside`` (float64 ``[rows]``)."""
    width = values.shape[1]
    total = outside + kept.sum(-1)
    n = torch.full((ids.shape[0], 1), width, device=ids.device)
    if cfg.kind == "topp":
        before = kept.cumsum(-1) - kept
        n = (before < cfg.p * total[:, None]).sum(-1, keepdim=True)
        n = n.clamp(min=min(cfg.min_k, width), max=width)
    dropped = (torch.arange(width, device=ids.device) >= n) | torch.isneginf(values)
    tail = ((outside + kept.masked_fill(~dropped, 0.0).sum(-1)) / total).log()
    logp = (values.double() - total.log()[:, None]).masked_fill(dropped, float("-inf"))
    width = int((~dropped).sum(-1).max())
    ids = ids.masked_fill(dropped, EMPTY_ID)[:, :width]
    logp = logp[:, :width].float()
    return SparseTargets(ids[None].cpu(), logp[None].cpu(), tail.float()[None].cpu(), cfg.kind)


def sample_uniforms(key: str, seed: int, positions: np.ndarray, draws: int) -> np.ndarray:
    """Uniforms in [0, 1) ``[len(positions), draws]``, a pure function of (seed, key, pos, draw)."""
    base = np.uint64(
        int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "little")
    )
    counter = positions.astype(np.uint64)[:, None] * np.uint64(draws) + np.arange(
        1, draws + 1, dtype=np.uint64
    )
    z = base + counter * _GOLDEN  # SplitMix64: state = seed + i * golden, then the finalizer
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sampled_logp(counts: np.ndarray, draws: int) -> np.ndarray:
    """``log(count / N)`` as float32 (the one definition shared by sparsify and decode)."""
    return np.log(counts / draws).astype(np.float32)


def _sampled(probs: torch.Tensor, cfg: CodecConfig, key: str, start: int) -> SparseTargets:
    """RS-KD targets of one row block of unnormalized probs at positions ``start ..``."""
    n_rows, draws = probs.shape[0], cfg.draws
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = sample_uniforms(key, cfg.seed, np.arange(start, start + n_rows), draws)
    target = torch.from_numpy(u).to(cdf.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    return drawn_targets(drawn)


def drawn_targets(drawn_SN: torch.Tensor) -> SparseTargets:
    """``sampled`` targets from the id of every draw ``[rows, N]``: the distinct ids per row with
    ``logp = log(count / N)``, count descending, then id (a canonical order)."""
    n_rows, draws = drawn_SN.shape
    drawn = drawn_SN.sort(-1).values.cpu().numpy().ravel()
    first = np.ones(drawn.size, dtype=bool)
    first[1:] = drawn[1:] != drawn[:-1]
    first[::draws] = True  # every row starts a run
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, drawn.size))
    rows, ids = starts // draws, drawn[starts]
    order = np.lexsort((ids, -counts, rows))  # canonical: count descending, then id
    rows, ids, counts = rows[order], ids[order], counts[order]
    per_row = np.bincount(rows, minlength=n_rows)
    cols = np.arange(rows.size) - (np.cumsum(per_row) - per_row)[rows]
    width = int(per_row.max())
    ids_SK = np.full((n_rows, width), EMPTY_ID, dtype=np.int64)
    logp_SK = np.full((n_rows, width), -np.inf, dtype=np.float32)
    ids_SK[rows, cols] = ids
    logp_SK[rows, cols] = sampled_logp(counts, draws)
    tail = torch.full((1, n_rows), float("-inf"))
    return SparseTargets(
        torch.from_numpy(ids_SK)[None], torch.from_numpy(logp_SK)[None], tail, "sampled"
    )


def concat_positions(parts: list[SparseTargets]) -> SparseTargets:
    """Join ``B = 1`` targets of consecutive position blocks, padding ``K`` with empty slots."""
    if len({p.kind for p in parts}) != 1 or any(p.shape[0] != 1 for p in parts):
        raise ValueError("concat_positions: parts must be B=1 targets of one kind")
    if len(parts) == 1:
        return parts[0]
    width = max(p.shape[2] for p in parts)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[2]), value=value)

    return SparseTargets(
        torch.cat([pad(p.ids, EMPTY_ID) for p in parts], dim=1),
        torch.cat([pad(p.logp, float("-inf")) for p in parts], dim=1),
        torch.cat([p.tail_logp for p in parts], dim=1),
        parts[0].kind,
    )
