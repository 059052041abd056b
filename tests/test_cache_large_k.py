"""Large supports end to end: the cache writer stores top-4096 and full-vocabulary targets of the
SmolLM2 fixture teacher (V = 49,152), and what the reader decodes is the teacher's exact
distribution to within 1e-3 nats per position and gives the full-vocabulary KD loss.

The reference is the teacher's own float32 log-probs (what the writer sparsifies), renormalized
in float64; the per-position KL is over the decoded support plus its tail bucket (the whole
vocabulary for ``k = full``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cache import make_tokens
from kdscale.cache.codec import TARGETS_MEMBER, decode
from kdscale.cache.manifest import CacheShardRecord
from kdscale.cache.targets import SparseTargets
from kdscale.cache.writer import ShardTask, write_cache_shard
from kdscale.config import load_config
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import iter_token_shard
from kdscale.data.tarindex import ShardFiles, index_shard
from kdscale.losses import KDLossConfig, kd_lm_loss
from kdscale.teacher import build_teacher

SUPPORTS = ("4096", "full")
VOCAB = 49152


@pytest.fixture(scope="module")
def cached(module_tmp_path: Path, smollm2_dir: Path) -> dict:
    """One token shard (4 samples × 32 positions) cached at each support by the real writer,
    the decoded targets, and the teacher's exact log-probs ``[B, S, V]``."""
    root = module_tmp_path
    tokens_dir = make_tokens(root / "tokens", seq_len=32, shard_samples=4, source="stdlib:python/bisect.py")
    shard = load_tokens_manifest(tokens_dir).splits["train"].shards[0]
    token_path = tokens_dir / shard.name
    teacher = build_teacher(load_config(None, [f"cache.teacher.model={smollm2_dir}"]).cache.teacher)
    inputs = torch.from_numpy(np.stack([t[:-1] for _, t in iter_token_shard(token_path)]).astype(np.int64))
    exact = torch.cat([logp for _, logp in teacher.logits_chunks(inputs, 32)], 1).double()
    out: dict = {"exact": torch.log_softmax(exact, -1), "inputs": inputs}
    for k in SUPPORTS:
        cfg = load_config(None, [f"cache.codec.k={k}", "cache.batch_size=2", "cache.probe_every=4"]).cache
        task = ShardTask("train", str(token_path), shard.sha256, str(root / f"k{k}.tar"), shard.samples, 32)
        record = write_cache_shard(task, teacher, cfg)
        decoded = [decode(blob, cfg.codec, VOCAB) for blob in members(Path(task.out_path))]
        out[k] = (record, SparseTargets.stack(decoded))
    return out


def members(path: Path) -> list[bytes]:
    """Every encoded member of one cache shard, in stored order."""
    index, files = index_shard(path, TARGETS_MEMBER, "cache shard"), ShardFiles()
    try:
        return [files.read(path, index, i) for i in range(len(index))]
    finally:
        files.close()


def bucket_kl(exact_BSV: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """KL(exact ‖ decoded) ``[B, S]`` over the decoded support plus the tail bucket."""
    valid = targets.valid
    p_kept = torch.where(valid, exact_BSV.gather(-1, targets.ids.clamp(min=0)), -math.inf)
    rest = exact_BSV.scatter(-1, targets.ids.clamp(min=0), -math.inf)
    everything = valid.sum(-1, keepdim=True) == exact_BSV.shape[-1]
    rest = torch.where(everything, -math.inf, rest)  # k = V: no id outside the support
    p_tail = rest.logsumexp(-1)
    q, q_tail = targets.logp.double(), targets.tail_logp.double()
    kept = torch.where(valid, p_kept.exp() * (p_kept - q), 0.0).sum(-1)
    return kept + torch.where(torch.isneginf(p_tail), 0.0, p_tail.exp() * (p_tail - q_tail))


@pytest.mark.parametrize("k", SUPPORTS)
def test_large_k_cache_decodes_to_the_teachers_distribution(cached: dict, k: str) -> None:
    record, targets = cached[k]
    exact = cached["exact"]
    assert isinstance(record, CacheShardRecord) and targets.shape[:2] == exact.shape[:2]
    kl = bucket_kl(exact, targets)
    assert float(kl.max()) <= 1e-3, float(kl.max())
    assert record.fidelity.quant_kl_mean <= 1e-3
    if k == "full":  # every id, in id order, no tail; the probes see the whole distribution
        assert torch.equal(targets.ids, torch.arange(VOCAB).expand_as(targets.ids))
        assert torch.all(torch.isneginf(targets.tail_logp))
        assert record.fidelity.covered_mass_min == pytest.approx(1.0, abs=1e-9)
        assert record.fidelity.kl_max is not None and record.fidelity.kl_max < 1e-6
    else:  # the 4096 most likely ids (ties at the boundary may go either way)
        assert torch.all(targets.valid.sum(-1) == 4096)
        p = exact.exp()
        kept_min = torch.where(targets.valid, p.gather(-1, targets.ids), math.inf).amin(-1)
        rest_max = p.scatter(-1, targets.ids, 0.0).amax(-1)
        assert torch.all(kept_min >= rest_max * (1 - 1e-5))
        assert record.fidelity.covered_mass_mean > 0.99


def test_full_vocabulary_cache_gives_full_forward_kl(cached: dict) -> None:
    """The existing K = V loss identity (tests/test_losses_exact.py), through a cache."""
    _, targets = cached["full"]
    batch, seq = targets.shape[:2]
    gen = torch.Generator().manual_seed(19)
    logits_SBV = torch.randn(seq, batch, VOCAB, generator=gen, dtype=torch.float64)
    labels = cached["inputs"].roll(-1, 1)
    out = kd_lm_loss(logits_SBV.clone(), targets, labels, KDLossConfig(kd_weight=1.0))
    p_logp = targets.logp.double()
    logq = torch.log_softmax(logits_SBV.transpose(0, 1), -1)
    full_kl = (p_logp.exp() * (p_logp - logq)).sum(-1)
    torch.testing.assert_close(out.loss, full_kl, rtol=1e-10, atol=1e-12)
    # float32 log-probs: the decoded mass adds up to one within float32 rounding.
    torch.testing.assert_close(
        out.metrics["covered_mass"], torch.tensor(1.0, dtype=torch.float64), atol=1e-5, rtol=0
    )

