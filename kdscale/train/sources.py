"""The samples a run trains and evaluates on: one token set (``train.tokens``) or a weighted blend
of several (``train.sources``), and the order its global batches take them in.

    data = open_run_data(inputs, seed=1234, source_samples=progress.source_samples)
    data.order.batch(consumed, global_batch)     # sample indices into data.train
    data.evals                                   # {source name: eval split} ("" for one token set)

A blend's global batch of ``G`` samples (:class:`BlendOrder`) takes ``floor(w G)`` or
``ceil(w G)`` samples from each source of normalised weight ``w``: the extra samples go to the
sources furthest below their weight over the run so far (exact rational arithmetic, ties to the
earlier source), so every batch holds each source's share within one sample and the shares over
the run converge to the weights. Each source takes its next samples in its own seeded per-epoch
permutation (:class:`~kdscale.train.loader.GlobalOrder`), so a source that runs out starts its
next epoch while the others continue theirs. The batch is then shuffled (seeded by the samples
consumed before it), so data-parallel ranks see a mix. A batch depends only on the samples each
source gave before it, which every checkpoint records (``source_samples``): resume is exact, and
any layout, which only slices the global batch, sees the same order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch.distributed as dist

from kdscale.cache.reader import open_samples
from kdscale.cache.targets import SparseTargets
from kdscale.data.store import TokenStore
from kdscale.logging import get_logger
from kdscale.train.loader import BatchOrder, GlobalOrder, SampleStore

if TYPE_CHECKING:
    from kdscale.train.checks import RunInputs, RunSource

log = get_logger(__name__)

_BLEND = 0x626C656E  # "blen": the stream tag of a blend's orders
_MEMO = 256  # per-source counts remembered (the prefetch thread runs a few batches ahead)


class BlendStore:
    """The samples of several stores end to end: sample ``offset_k + i`` is store ``k``'s ``i``."""

    def __init__(self, stores: list[SampleStore]) -> None:
        self.stores = stores
        self.offsets = np.cumsum([0, *(len(s) for s in stores)])
        self.has_targets = all(s.has_targets for s in stores)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[SampleStore, int]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.stores[k], i - int(self.offsets[k])

    def tokens(self, i: int) -> np.ndarray:
        """The token ids of blended sample ``i``."""
        store, j = self._locate(i)
        return store.tokens(j)

    def targets(self, i: int) -> SparseTargets:
        """The teacher targets of blended sample ``i``."""
        store, j = self._locate(i)
        return store.targets(j)

    def close(self) -> None:
        """Close every store."""
        for store in self.stores:
            store.close()


class BlendOrder:
    """The global batches of a weighted blend (see the module docstring). Thread-safe."""

    def __init__(
        self, sizes: list[int], weights: list[float], seed: int, consumed: list[int] | None = None
    ) -> None:
        fractions = [Fraction(str(w)) for w in weights]  # 0.7 means 7/10, not the float's binary value
        self.weights = [w / sum(fractions) for w in fractions]
        self.orders = [GlobalOrder(n, seed, (_BLEND, k)) for k, n in enumerate(sizes)]
        self.offsets = np.cumsum([0, *sizes])
        self.seed = seed
        start = list(consumed or [0] * len(sizes))
        self._memo: OrderedDict[int, list[int]] = OrderedDict({sum(start): start})
        self._lock = threading.Lock()

    def quotas(self, counts: list[int], global_batch: int) -> list[int]:
        """Samples each source gives the next batch, after it gave ``counts`` before."""
        total = sum(counts) + global_batch
        base = [int(w * global_batch) for w in self.weights]  # floor: weights are positive
        behind = [w * total - (c + b) for w, c, b in zip(self.weights, counts, base)]
        extra = sorted(range(len(base)), key=lambda k: (-behind[k], k))[: global_batch - sum(base)]
        return [b + (k in extra) for k, b in enumerate(base)]

    def counts(self, consumed: int, global_batch: int) -> list[int]:
        """Samples each source gave in the first ``consumed`` samples (batches of ``global_batch``
        since the resume point)."""
        with self._lock:
            known = max(t for t in self._memo if t <= consumed)
            counts = self._memo[known]
            while known < consumed:
                counts = [c + q for c, q in zip(counts, self.quotas(counts, global_batch))]
                known += global_batch
                self._memo[known] = counts
                if len(self._memo) > _MEMO:
                    self._memo.popitem(last=False)
            assert known == consumed, f"{consumed} samples is not a whole number of batches"
            return counts

    def batch(self, consumed: int, global_batch: int) -> np.ndarray:
        """The blended sample indices of the global batch after ``consumed`` samples."""
        counts = self.counts(consumed, global_batch)
        parts = [
            self.offsets[k] + order.samples(count, quota)
            for k, (order, count, quota) in enumerate(
                zip(self.orders, counts, self.quotas(counts, global_batch))
            )
        ]
        rng = np.random.Generator(np.random.PCG64([self.seed, _BLEND, consumed]))
        return rng.permutation(np.concatenate(parts))


@dataclass
class RunData:
    """What a run reads: the training samples, their order, and each source's eval split."""

    train: SampleStore
    order: BatchOrder
    evals: dict[str, SampleStore]

    def close(self) -> None:
        """Close every store."""
        self.train.close()
        for store in self.evals.values():
            store.close()


def _eval_split(source: "RunSource") -> TokenStore:
    """A source's eval split, with targets only if its cache covers all of it."""
    cache = source.cache
    if cache is not None:
        split = source.tokens.splits.get("eval")
        names = {s.name for s in split.shards} if split is not None else set()
        if not names <= set(cache.manifest.shards):
            cache = None
            if dist.get_rank() == 0:
                where = f" of source {source.name}" if source.name else ""
                log.warning("the eval split%s is not cached: evaluating the LM loss without KL", where)
    return open_samples(source.tokens_dir, source.tokens, "eval", cache)


def open_run_data(inputs: "RunInputs", seed: int, source_samples: dict[str, int]) -> RunData:
    """The samples and order of a checked run; a blend resumes after ``source_samples``."""
    sources = inputs.sources
    train = [open_samples(s.tokens_dir, s.tokens, "train", s.cache) for s in sources]
    evals = {s.name: _eval_split(s) for s in sources}
    if not inputs.blend:
        return RunData(train[0], GlobalOrder(inputs.train_samples, seed), evals)
    consumed = [source_samples.get(s.name, 0) for s in sources]
    order = BlendOrder([len(t) for t in train], [s.weight for s in sources], seed, consumed)
    return RunData(BlendStore(train), order, evals)
