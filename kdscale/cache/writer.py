"""Write one cache shard: token shard → teacher → sparse targets → codec → atomic tar.

Members are ``<key>.targets`` (one codec blob per sample, in the token shard's order), so the
cache shard is a webdataset tar with the same keys as its token shard. The teacher runs on the
calling thread while a background thread encodes and writes the previous sample, so encoding
overlaps the teacher. The file appears under its final name only once complete (temp name →
fsync → rename); a killed writer leaves a hidden ``.*.tmp`` file that the runner removes.

Every rank of a teacher group runs :func:`write_cache_shard` on the same task: the ranks holding
logits sparsify their vocabulary shards together (:mod:`kdscale.cache.vocab_parallel`), earlier
pipeline stages only run their layers, and the one rank that :attr:`~kdscale.teacher.base.Teacher.writes`
encodes and commits the file; the others return None.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from kdscale.cache.codec import TARGETS_MEMBER, decode, encode
from kdscale.cache.fidelity import fidelity, support_kl
from kdscale.cache.manifest import CacheShardRecord, Fidelity
from kdscale.cache.sparsify import concat_positions, sparsify
from kdscale.cache.targets import SparseTargets
from kdscale.cache.vocab_parallel import sparsify_shard
from kdscale.config.cache import CacheConfig
from kdscale.data.shards import iter_token_shard
from kdscale.errors import KDScaleError
from kdscale.io import atomic_open, sha256_file
from kdscale.teacher.base import Teacher, VocabShard

QUANT_CHECK_EVERY = 8  # every 8th member is decoded again to measure the quantization error


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a token shard and where its cache shard goes."""

    split: str
    token_path: str
    token_sha256: str
    out_path: str
    samples: int
    seq_len: int


class _FidelityStats:
    """Running fidelity of a shard: probe positions vs the full teacher, and quantization error."""

    def __init__(self) -> None:
        self.covered: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.tv: list[torch.Tensor] = []
        self.support: list[torch.Tensor] = []
        self.quant_kl: list[torch.Tensor] = []

    def add_probes(
        self, logp_SV: torch.Tensor, targets: SparseTargets, rows: torch.Tensor, temperature: float,
        shard: VocabShard | None,
    ) -> None:  # fmt: skip
        """Compare the kept targets at ``rows`` with the full teacher distribution (its
        ``shard`` columns on a tensor rank: collective)."""
        if rows.numel() == 0:
            return
        probe = SparseTargets(targets.ids[:, rows], targets.logp[:, rows], targets.tail_logp[:, rows], targets.kind)
        stats = fidelity(logp_SV[rows], probe, temperature, shard)
        self.covered.append(stats.covered_mass)
        self.kl.append(stats.kl)
        self.tv.append(stats.tv)
        self.support.append(probe.valid.sum(-1)[0].double())

    def add_quantization(self, targets: SparseTargets, decoded: SparseTargets) -> None:
        """KL from the exact kept targets to what the codec stores (all positions)."""
        if targets.kind != "sampled":  # counts are stored exactly
            self.quant_kl.append(support_kl(targets, decoded).flatten())

    def summary(self) -> Fidelity:
        covered, kl, tv, support = (torch.cat(x) for x in (self.covered, self.kl, self.tv, self.support))
        finite_kl = bool(torch.isfinite(kl).all())
        quant_kl = torch.cat(self.quant_kl) if self.quant_kl else torch.zeros(1, dtype=torch.float64)
        return Fidelity(
            positions=int(covered.numel()),
            covered_mass_mean=float(covered.mean()),
            covered_mass_min=float(covered.min()),
            kl_mean=float(kl.mean()) if finite_kl else None,
            kl_max=float(kl.max()) if finite_kl else None,
            tv_mean=float(tv.mean()),
            support_mean=float(support.mean()),
            quant_kl_mean=float(quant_kl.mean()),
        )


def _batch_targets(
    teacher: Teacher, inputs: torch.Tensor, keys: list[str], cfg: CacheConfig, stats: _FidelityStats
) -> list[SparseTargets]:
    """Sparse targets of every row, sparsifying each teacher chunk as it arrives (one
    ``[B, chunk, V]`` block alive at a time), with probe fidelity; none on a pipeline stage
    before the last."""
    parts: list[list[SparseTargets]] = [[] for _ in keys]
    shard = teacher.vocab_shard
    for start, logp in teacher.logits_chunks(inputs, cfg.teacher.chunk):
        positions = torch.arange(start, start + logp.shape[1])
        probes = torch.nonzero(positions % cfg.probe_every == 0).flatten()
        for row, key in enumerate(keys):
            if shard is None:
                part = sparsify(logp[row], cfg.codec, key, start)
            else:
                part = sparsify_shard(logp[row], cfg.codec, shard, key, start)
            stats.add_probes(logp[row], part, probes, cfg.codec.temperature, shard)
            parts[row].append(part)
    return [concat_positions(p) for p in parts if p]


def _batches(samples: list[tuple[str, np.ndarray]], batch_size: int) -> Iterator[tuple[int, torch.Tensor, list[str]]]:
    """``(first index, inputs [B, S], keys)`` of consecutive samples."""
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin : begin + batch_size]
        yield begin, torch.from_numpy(np.stack([t[:-1] for _, t in batch]).astype(np.int64)), [k for k, _ in batch]


@contextlib.contextmanager
def _closed_quietly(tar: wds.TarWriter) -> Iterator[wds.TarWriter]:
    """``tar``, closed when the block ends even if it failed (on a full disk its buffer is
    dropped here rather than flushed, and complained about, by a finalizer later)."""
    try:
        yield tar
    finally:
        with contextlib.suppress(OSError):
            tar.close()


def write_cache_shard(task: ShardTask, teacher: Teacher, cfg: CacheConfig) -> CacheShardRecord | None:
    """Score every sample of ``task``'s token shard and commit its cache shard atomically; on a
    rank of a teacher group that does not write, take part and return None."""
    samples = list(iter_token_shard(task.token_path, sha256=task.token_sha256))
    if len(samples) != task.samples:
        raise KDScaleError(f"{task.token_path}: {len(samples)} samples, the manifest says {task.samples}")
    vocab = teacher.vocab_size
    stats = _FidelityStats()
    if not teacher.writes:  # this rank's share of the group's forward passes and collectives
        for _, inputs, keys in _batches(samples, cfg.batch_size):
            _batch_targets(teacher, inputs, keys, cfg, stats)
        return None
    out = Path(task.out_path)
    with atomic_open(out) as handle, _closed_quietly(wds.TarWriter(handle, mtime=0.0)) as tar, \
            ThreadPoolExecutor(max_workers=1) as encoder:
        pending: Future[None] | None = None

        def emit(index: int, key: str, targets: SparseTargets) -> None:
            blob = encode(targets, cfg.codec, vocab)
            if index % QUANT_CHECK_EVERY == 0:  # decode a sample of members: quantization error
                stats.add_quantization(targets, decode(blob, cfg.codec, vocab))
            tar.write({"__key__": key, TARGETS_MEMBER: blob})

        for begin, inputs, keys in _batches(samples, cfg.batch_size):
            for row, (key, targets) in enumerate(zip(keys, _batch_targets(teacher, inputs, keys, cfg, stats))):
                if pending is not None:
                    pending.result()  # keeps members in order; re-raises encoder errors
                pending = encoder.submit(emit, begin + row, key, targets)
        if pending is not None:
            pending.result()
        tar.close()
    return CacheShardRecord(
        name=out.name,
        split=task.split,
        token_shard=Path(task.token_path).name,
        samples=len(samples),
        tokens=len(samples) * task.seq_len,
        bytes=out.stat().st_size,
        sha256=sha256_file(out),
        fidelity=stats.summary(),
        host=socket.gethostname(),
    )

