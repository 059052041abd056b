"""The training data path and checkpoint bookkeeping, without a model.

Random access (CachedSplit.targets) must return exactly what the cache reader streams; the global
order must be a per-epoch permutation that any data-parallel split and any resume point
reproduce; evaluation must count every held-out sample once; the ``latest`` pointer must never
name a half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdscale.cache.reader import CachedSplit, open_cache
from kdscale.cache.targets import SparseTargets
from kdscale.config import ModelConfig
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.store import TokenStore
from kdscale.errors import KDScaleError
from kdscale.models import count_parameters
from kdscale.models.checkpoints import (
    CHECKPOINTS,
    LATEST,
    STATE,
    latest_checkpoint,
    resolve_checkpoint,
    step_name,
)
from kdscale.train.checkpoint import remove_interrupted_saves
from kdscale.train.loader import GlobalOrder, Needs, TrainLoader, eval_batches
from kdscale.train.metrics import flops_per_token

BOTH = Needs(tokens=True, targets=True)


@pytest.fixture(scope="module")
def store(tiny_tokens_dir: Path, tiny_cache_dir: Path) -> CachedSplit:
    cache = open_cache(tiny_cache_dir, tiny_tokens_dir, vocab_size=49152)
    return cache.split("train")


def test_random_access_matches_the_cache_reader(
    store: CachedSplit, tiny_tokens_dir: Path, tiny_cache_dir: Path
) -> None:
    cache = open_cache(tiny_cache_dir, tiny_tokens_dir, vocab_size=49152)
    streamed = list(cache.iter_split("train"))
    assert len(store) == len(streamed) == 392
    for i in [*range(len(streamed))][::-1]:  # backwards: no reliance on sequential reads
        _, tokens, targets = streamed[i]
        assert np.array_equal(store.tokens(i), tokens)
        got = store.targets(i)
        assert torch.equal(got.ids, targets.ids) and torch.equal(got.logp, targets.logp)
        assert torch.equal(got.tail_logp, targets.tail_logp) and got.kind == targets.kind


def test_cache_shard_of_other_samples_is_refused(
    tmp_path: Path, tiny_tokens_dir: Path, tiny_cache_dir: Path
) -> None:
    cache_dir = tmp_path / "cache"
    shutil.copytree(tiny_cache_dir, cache_dir)
    first, second = sorted(cache_dir.glob("train-*.tar"))[:2]
    first.write_bytes(second.read_bytes())  # same sample count, other keys
    tokens = load_tokens_manifest(tiny_tokens_dir)
    cache = open_cache(cache_dir, tiny_tokens_dir, vocab_size=49152)
    bad = cache.split("train")
    plain = TokenStore(tiny_tokens_dir, tokens, "train")
    assert np.array_equal(bad.tokens(0), plain.tokens(0))  # the tokens are still readable
    with pytest.raises(KDScaleError, match="does not match its token shard"):
        bad.targets(0)


def test_global_order_is_a_seeded_permutation_per_epoch() -> None:
    order = GlobalOrder(10, seed=3)
    two_epochs = order.samples(0, 20)
    assert sorted(two_epochs[:10]) == sorted(two_epochs[10:]) == list(range(10))
    assert not np.array_equal(two_epochs[:10], two_epochs[10:])
    assert np.array_equal(GlobalOrder(10, seed=3).samples(7, 9), two_epochs[7:16])
    assert not np.array_equal(GlobalOrder(10, seed=4).samples(0, 10), two_epochs[:10])


def _loader(
    store: CachedSplit, consumed: int, dp_rank: int, dp_size: int, prefetch: int
) -> TrainLoader:
    return TrainLoader(
        store, GlobalOrder(len(store), seed=7), consumed_samples=consumed, global_batch=8,
        micro_batch=2, dp_rank=dp_rank, dp_size=dp_size, needs=BOTH, prefetch=prefetch,
    )  # fmt: skip


def _steps(loader: TrainLoader, count: int) -> list[torch.Tensor]:
    try:
        return [torch.cat([mb.tokens for mb in loader.next_step()]) for _ in range(count)]
    finally:
        loader.close()


def test_data_parallel_ranks_split_each_global_batch(store: CachedSplit) -> None:
    whole = _steps(_loader(store, 0, 0, 1, prefetch=0), 3)
    halves = [_steps(_loader(store, 0, rank, 2, prefetch=2), 3) for rank in range(2)]
    for step in range(3):
        assert torch.equal(torch.cat([halves[0][step], halves[1][step]]), whole[step])


def test_targets_travel_with_their_tokens(store: CachedSplit) -> None:
    loader = _loader(store, 0, 0, 1, prefetch=0)
    batch = loader.next_step()
    loader.close()
    assert len(batch) == loader.micro_batches == 4
    first = GlobalOrder(len(store), seed=7).samples(0, 2).tolist()
    tokens = np.stack([store.tokens(i) for i in first]).astype(np.int64)
    assert torch.equal(batch[0].tokens, torch.from_numpy(tokens))
    want, got = SparseTargets.stack([store.targets(i) for i in first]), batch[0].targets
    assert torch.equal(got.ids, want.ids) and torch.equal(got.logp, want.logp)


def test_resumed_loader_continues_the_same_order(store: CachedSplit) -> None:
    straight = _steps(_loader(store, 0, 0, 1, prefetch=2), 5)
    resumed = _steps(_loader(store, 3 * 8, 0, 1, prefetch=2), 2)
    assert all(torch.equal(a, b) for a, b in zip(straight[3:], resumed))


def test_epochs_wrap_without_dropping_samples(store: CachedSplit) -> None:
    steps = _steps(_loader(store, 0, 0, 1, prefetch=0), 392 // 8)
    rows = {tuple(row.tolist()) for step in steps for row in step}
    assert len(rows) == 392  # one epoch of 49 steps visits every sample once


def test_eval_batches_count_every_sample_once(store: CachedSplit) -> None:
    limit, seen = 13, []
    for rank in range(2):
        count, batches = eval_batches(store, limit, micro_batch=2, dp_rank=rank, dp_size=2,
                                      needs=Needs(tokens=True, targets=False))  # fmt: skip
        batches = list(batches)
        assert count == len(batches) == 4  # ceil(13 / 4) micro-batches of 2 per rank
        for batch in batches:
            for row, weight in zip(batch.tokens, batch.mask[:, 0]):
                if weight:
                    seen.append(tuple(row.tolist()))
    assert seen == [tuple(store.tokens(i).tolist()) for i in range(limit)]


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / CHECKPOINTS / step_name(step)
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"shards")
    if complete:
        (path / STATE).write_text(json.dumps({"step": step}))
    return path


def test_latest_never_names_a_half_written_checkpoint(tmp_path: Path) -> None:
    four = _fake_checkpoint(tmp_path, 4)
    (tmp_path / CHECKPOINTS / LATEST).write_text(step_name(4) + "\n")
    interrupted = tmp_path / CHECKPOINTS / f".{step_name(8)}.tmp"
    interrupted.mkdir()
    _fake_checkpoint(tmp_path, 12, complete=False)  # cannot happen via save; still ignored
    assert latest_checkpoint(tmp_path) == four
    assert resolve_checkpoint(tmp_path, "CKPT") == four
    remove_interrupted_saves(tmp_path)
    assert not interrupted.exists() and four.is_dir()


def test_dangling_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 4)
    six = _fake_checkpoint(tmp_path, 6)
    (tmp_path / CHECKPOINTS / LATEST).write_text(step_name(9) + "\n")
    assert latest_checkpoint(tmp_path) == six
    assert latest_checkpoint(tmp_path / "elsewhere") is None
    with pytest.raises(KDScaleError, match="is not a model: expected a kdscale run directory"):
        resolve_checkpoint(tmp_path / "elsewhere", "CKPT")


def test_flop_count_matches_the_parameter_count() -> None:
    model = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                        num_query_groups=2, vocab_size=1000, tie_embeddings=False)  # fmt: skip
    h, seq = model.hidden_size, 128
    norms = (2 * model.num_layers + 1) * h
    matmul_weights = count_parameters(model) - model.vocab_size * h - norms  # minus the lookup
    attention = 3 * 2 * 2 * model.num_layers * seq * h  # QK^T and AV, forward + backward
    assert flops_per_token(model, seq) == 6 * matmul_weights + attention
