"""Which samples each rank trains on, step by step, assembled into micro-batches.

Order (DESIGN.md "Parallel layout"): one global sequence of sample positions; position ``p``
is sample ``perm_e[p mod N]`` of epoch ``e = p // N``, with ``perm_e`` a permutation of the
split's ``N`` samples seeded by ``(seed, e)``. Step ``t`` consumes positions
``[c, c + G)`` (``c`` = samples consumed before it, ``G`` = global batch); data-parallel rank
``r`` of ``D`` takes the contiguous slice ``[c + r·G/D, c + (r+1)·G/D)`` and splits it into
micro-batches. Tensor-parallel ranks of one data-parallel replica compute the same slice; only
ranks whose model chunks embed tokens (first pipeline stage) or compute the loss (last stage)
read anything. Resuming from ``c`` reproduces the order exactly, whatever the layout and
global batch were before.

Samples come from a :class:`kdscale.data.store.TokenStore` (tokens only) or a
:class:`kdscale.cache.reader.CachedSplit` (tokens and teacher targets). A weighted blend of
sources (``train.sources``) replaces both the store and the order
(:mod:`kdscale.train.sources`); the data-parallel slicing is the same. On a GPU the host
tensors of each micro-batch are pinned by the loader thread, so that :func:`batch_to_device`
copies them without blocking.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from kdscale.cache.targets import SparseTargets


@dataclass
class MicroBatch:
    """One micro-batch. ``tokens`` int64 ``[B, S + 1]`` (inputs ``[:, :-1]``, labels ``[:, 1:]``),
    ``targets`` ``[B, S, K]`` teacher targets for those labels, ``mask`` float ``[B, S]``
    (0 = padding, not counted; None = every position counts). Fields a rank does not need are
    None."""

    tokens: torch.Tensor | None = None
    targets: SparseTargets | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Needs:
    """What a rank (or one model chunk) reads: token ids (embedding or labels), cached targets."""

    tokens: bool
    targets: bool

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.tokens or other.tokens, self.targets or other.targets)


NOTHING = Needs(False, False)


class SampleStore(Protocol):
    """What the loader reads samples from: a :class:`~kdscale.data.store.TokenStore`, a
    :class:`~kdscale.cache.reader.CachedSplit` or a blend of them
    (:class:`~kdscale.train.sources.BlendStore`)."""

    has_targets: bool

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def targets(self, i: int) -> SparseTargets: ...


class BatchOrder(Protocol):
    """Which samples each global batch holds: :class:`GlobalOrder` (one token set) or
    :class:`~kdscale.train.sources.BlendOrder` (a weighted blend)."""

    def batch(self, consumed: int, global_batch: int) -> np.ndarray: ...


class GlobalOrder:
    """Global position → sample index: a seeded permutation of the split per epoch (``stream``
    tells apart the orders of several sources under one seed)."""

    def __init__(self, num_samples: int, seed: int, stream: tuple[int, ...] = ()) -> None:
        assert num_samples > 0
        self.num_samples, self.seed, self.stream = num_samples, seed, stream
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, *self.stream, epoch]))
            self._perm, self._epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def samples(self, start: int, count: int) -> np.ndarray:
        """Sample indices at positions ``start .. start + count``."""
        positions = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        for epoch in np.unique(positions // self.num_samples):
            sel = positions // self.num_samples == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.num_samples]
        return out

    def batch(self, consumed: int, global_batch: int) -> np.ndarray:
        """The sample indices of the global batch that starts after ``consumed`` samples."""
        return self.samples(consumed, global_batch)


def assemble(
    store: SampleStore, indices: list[int], needs: Needs, counted: np.ndarray | None = None
) -> MicroBatch:
    """Read and stack the samples ``indices`` into one micro-batch; ``counted`` (bool per
    sample, default all) becomes the loss mask. Pinned on a GPU machine."""
    if not (needs.tokens or needs.targets):
        return MicroBatch()
    tokens = torch.from_numpy(np.stack([store.tokens(i) for i in indices]).astype(np.int64))
    targets = None
    if needs.targets:
        targets = SparseTargets.stack([store.targets(i) for i in indices])
    mask = None
    if counted is not None:
        seq = tokens.shape[1] - 1
        mask = torch.from_numpy(counted.astype(np.float32))[:, None].expand(-1, seq).contiguous()
    batch = MicroBatch(tokens, targets, mask)
    return _pinned(batch) if torch.cuda.is_available() else batch


def _pinned(batch: MicroBatch) -> MicroBatch:
    def pin(x: torch.Tensor | None) -> torch.Tensor | None:
        return x.pin_memory() if x is not None else None

    targets = batch.targets
    if targets is not None:
        targets = SparseTargets(
            pin(targets.ids), pin(targets.logp), pin(targets.tail_logp), targets.kind
        )
    return MicroBatch(pin(batch.tokens), targets, pin(batch.mask))


def batch_to_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    """``batch`` with its tensors on ``device`` (the same object when already there); from
    pinned memory the copies do not block the host."""
    if batch.tokens is None or batch.tokens.device == device:
        return batch

    def move(x: torch.Tensor | None) -> torch.Tensor | None:
        return x.to(device, non_blocking=True) if x is not None else None

    targets = batch.targets
    if targets is not None:
        targets = SparseTargets(
            move(targets.ids), move(targets.logp), move(targets.tail_logp), targets.kind
        )
    return MicroBatch(move(batch.tokens), targets, move(batch.mask))


class TrainLoader:
    """This rank's micro-batches, one optimizer step at a time, prepared by a background thread.

    ``next_step()`` returns the ``micro_batches`` micro-batches of the next step (all empty on
    ranks that need no data). Reading and decoding run ``prefetch`` steps ahead in a thread
    (numpy and zstd release the GIL); errors are raised by ``next_step()``.
    """

    def __init__(
        self,
        store: SampleStore,
        order: BatchOrder,
        *,
        consumed_samples: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        needs: Needs,
        prefetch: int,
    ) -> None:
        assert global_batch % (micro_batch * dp_size) == 0
        self.store, self.order, self.needs = store, order, needs
        self.consumed = consumed_samples
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.share = global_batch // dp_size
        self.offset = dp_rank * self.share
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch and (needs.tokens or needs.targets):
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._fill, name="kdscale-loader", daemon=True)
            self._thread.start()

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step on this rank."""
        return self.share // self.micro_batch

    def step_batches(self, consumed: int) -> list[MicroBatch]:
        """The micro-batches of the step that starts after ``consumed`` samples."""
        batch = self.order.batch(consumed, self.global_batch)
        indices = batch[self.offset : self.offset + self.share].tolist()
        return [
            assemble(self.store, indices[m : m + self.micro_batch], self.needs)
            for m in range(0, self.share, self.micro_batch)
        ]

    def next_step(self) -> list[MicroBatch]:
        """The next step's micro-batches (waits for the prefetch thread if it is behind)."""
        if self._queue is None:
            batches = self.step_batches(self.consumed)
        else:
            batches = self._queue.get()
            if isinstance(batches, BaseException):
                raise batches
        self.consumed += self.global_batch
        return batches

    def _fill(self) -> None:
        consumed = self.consumed
        try:
            while not self._stop.is_set():
                self._put(self.step_batches(consumed))
                consumed += self.global_batch
        except BaseException as exc:  # handed to the training thread
            self._put(exc)

    def _put(self, item: list[MicroBatch] | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def eval_batches(
    store: SampleStore,
    limit: int,
    *,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    needs: Needs,
) -> tuple[int, Iterator[MicroBatch]]:
    """The first ``limit`` samples of ``store`` in stored order, spread over data-parallel ranks.

    Returns the number of micro-batches per rank (equal on all ranks) and this rank's
    micro-batches, read lazily. Rank ``r`` takes a contiguous block; the last micro-batches are
    padded with sample 0 under a zero mask, so no sample is dropped or counted twice.
    """
    count = min(limit, len(store))
    per_rank = -(-count // (micro_batch * dp_size)) * micro_batch  # ceil to whole micro-batches
    first = dp_rank * per_rank

    def generate() -> Iterator[MicroBatch]:
        for start in range(first, first + per_rank, micro_batch):
            positions = np.arange(start, start + micro_batch)
            real = positions < count
            yield assemble(store, np.where(real, positions, 0).tolist(), needs, real)

    return per_rank // micro_batch, generate()
