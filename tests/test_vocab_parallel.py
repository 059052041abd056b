"""Vocab-parallel sparsification on T = 2 gloo ranks equals the one-rank sparsifier on the same
logits: topk/topp ids identical, sampled draws identical, fidelity within float noise."""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist import run_distributed

from kdscale.cache.fidelity import fidelity
from kdscale.cache.sparsify import sparsify
from kdscale.cache.targets import SparseTargets
from kdscale.cache.vocab_parallel import bytes_per_position, sparsify_shard
from kdscale.config.cache import CodecConfig
from kdscale.teacher.base import VocabShard

VOCAB, ROWS = 1000, 256
CODECS = {
    "topk": CodecConfig(kind="topk", k=16),
    "topp": CodecConfig(kind="topp", p=0.9, max_k=32, temperature=2.0),
    "sampled": CodecConfig(kind="sampled", draws=64, seed=3),
    "full": CodecConfig(kind="topk", k="full"),
}


def _logits() -> torch.Tensor:
    """Peaked, teacher-like log-probs ``[ROWS, VOCAB]``, with ties and -inf columns."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, VOCAB, generator=g) * 4.0
    x[:, 7] = x[:, 8]  # an exact tie
    x[:, 990:] = float("-inf")  # ids a teacher never predicts
    return torch.log_softmax(x, dim=-1)


def _probes(t: SparseTargets) -> SparseTargets:
    """Every 16th position (the cache's probe positions)."""
    return SparseTargets(t.ids[:, ::16], t.logp[:, ::16], t.tail_logp[:, ::16], t.kind)


def _tie_order(t: SparseTargets) -> SparseTargets:
    """Slots ordered by id: torch.topk leaves the order of exactly tied values open, so one rank
    and T ranks may list two tied ids the other way round (the kept sets are equal)."""
    order = t.ids.argsort(-1)
    return SparseTargets(t.ids.gather(-1, order), t.logp.gather(-1, order), t.tail_logp, t.kind)


def _worker(rank: int, world: int) -> dict:
    full = _logits()
    width = VOCAB // world
    shard = VocabShard(dist.group.WORLD, world, rank * width, VOCAB)
    local = full[:, rank * width : (rank + 1) * width]
    out = {}
    for name, cfg in CODECS.items():
        targets = sparsify_shard(local, cfg, shard, key="sample", start=5)
        out[name] = (targets, fidelity(local[::16], _probes(targets), cfg.temperature, shard))
    return out


def test_vocab_parallel_sparsify_equals_one_rank() -> None:
    results = run_distributed(_worker, world_size=2)
    full = _logits()
    for name, cfg in CODECS.items():
        want = sparsify(full, cfg, key="sample", start=5)
        want_stats = fidelity(full[::16], _probes(want), cfg.temperature)
        for got, stats in (r[name] for r in results):  # every rank holds the same targets
            got, want_ = _tie_order(got), _tie_order(want)
            assert torch.equal(got.ids, want_.ids), name
            finite = torch.isfinite(want_.logp)
            assert torch.equal(finite, torch.isfinite(got.logp)), name
            assert torch.allclose(got.logp[finite], want_.logp[finite], rtol=0, atol=1e-6), name
            assert torch.allclose(got.tail_logp.exp(), want.tail_logp.exp(), rtol=0, atol=1e-6), name
            for field in ("covered_mass", "kl", "tv"):
                a, b = getattr(stats, field), getattr(want_stats, field)
                assert torch.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True), (name, field)


def test_bytes_per_position_is_o_of_k_not_v() -> None:
    assert bytes_per_position(CODECS["topk"], VOCAB) == 4 + 12 * 16 + 8
    assert bytes_per_position(CODECS["sampled"], VOCAB) == 4 + 8 + 8 * 64
    assert bytes_per_position(CODECS["full"], VOCAB) == 4 * VOCAB
