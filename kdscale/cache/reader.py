"""Read a cache in step with its token shards: the one place tokens and cached targets are joined.

    cache = open_cache("runs/cache", "runs/tokens", vocab_size=49152)
    for key, tokens, targets in cache.iter_split("train"):      # in stored order
        ...
    samples = cache.split("train")                               # random access
    tokens, targets = samples.tokens(i), samples.targets(i)

:func:`open_cache` refuses a cache whose fingerprints do not match the token set (or the
student's vocabulary, tokenizer or expected teacher), naming the field that differs. A cache
shard is joined with its token shard the first time it is touched: both are indexed (tar headers
only) and their keys compared position by position, so a cache shard that does not belong to
its token shard is refused before any of its samples is used. Targets are decoded on demand,
one sample at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.cache.codec import TARGETS_MEMBER, decode
from kdscale.cache.manifest import CacheManifest, load_cache_manifest
from kdscale.cache.targets import SparseTargets
from kdscale.config.cache import CodecConfig
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.data.shards import check_sha256
from kdscale.data.store import TokenStore
from kdscale.data.tarindex import ShardIndex, index_shard
from kdscale.errors import KDScaleError


def _check(field: str, cache_value: object, expected: object, cache_dir: str | Path) -> None:
    if expected is not None and cache_value != expected:
        raise KDScaleError(
            f"{field}: cache {cache_dir} has {cache_value!r}, expected {expected!r}; the cache was "
            "made for other inputs (re-run `kdscale cache` for these)"
        )


@dataclass
class Cache:
    """An opened, validated cache and the token set it belongs to."""

    root: Path
    tokens_root: Path
    manifest: CacheManifest
    tokens: TokensManifest
    verify: bool = False  # iter_shard checks both files' sha256 against the manifests first

    @property
    def codec(self) -> CodecConfig:
        """The codec the cache was written with."""
        return CodecConfig.model_validate(self.manifest.header.codec)

    @property
    def vocab_size(self) -> int:
        """Width of the teacher distribution (the student's vocabulary must equal it)."""
        return self.manifest.header.vocab_size

    def shard_names(self, split: str) -> list[str]:
        """Token-shard names of ``split``; each must have a committed cache shard."""
        names = [s.name for s in self.tokens.splits[split].shards] if split in self.tokens.splits else []
        missing = [n for n in names if n not in self.manifest.shards]
        if missing:
            raise KDScaleError(
                f"{self.root}: {len(missing)} of {len(names)} {split!r} shards are not cached yet "
                f"(first: {missing[0]}); finish `kdscale cache` first"
            )
        return names

    def split(self, split: str) -> "CachedSplit":
        """Random access to ``split``'s samples with their targets (every shard must be cached)."""
        return CachedSplit(self, split)

    def iter_shard(self, name: str) -> Iterator[tuple[str, np.ndarray, SparseTargets]]:
        """``(key, tokens, targets)`` of one shard pair in stored order."""
        split = next(s for s, rec in self.tokens.splits.items() if name in {x.name for x in rec.shards})
        samples = self.split(split)
        try:
            shard = samples.names.index(name)
            if self.verify:
                token_rec = self.tokens.splits[split].shards[shard]
                check_sha256(samples.paths[shard], token_rec.sha256, "token shard")
                check_sha256(self.root / name, self.manifest.shards[name].sha256, "cache shard")
            yield from samples.iter_shard(shard)
        finally:
            samples.close()

    def iter_split(self, split: str) -> Iterator[tuple[str, np.ndarray, SparseTargets]]:
        """Every sample of ``split`` in stored order."""
        for name in self.shard_names(split):
            yield from self.iter_shard(name)


class CachedSplit(TokenStore):
    """The samples of one split with their cached teacher targets. Thread-safe."""

    has_targets = True

    def __init__(self, cache: Cache, split: str) -> None:
        super().__init__(cache.tokens_root, cache.tokens, split)
        self._cache = cache
        self._codec, self._vocab = cache.codec, cache.vocab_size
        self.cache_paths = [cache.root / name for name in cache.shard_names(split)]
        self._target_indexes: dict[int, ShardIndex] = {}
        self._target_lock = threading.Lock()

    def targets(self, i: int) -> SparseTargets:
        """The teacher targets ``[1, seq_len, K]`` of sample ``i``."""
        shard, position = self.locate(i)
        return self._decode(shard, position)

    def iter_shard(self, shard: int) -> Iterator[tuple[str, np.ndarray, SparseTargets]]:
        """``(key, tokens, targets)`` of every sample of shard ``shard``, in stored order."""
        index = self.target_index(shard)
        first = int(self._starts[shard])
        for position, key in enumerate(index.keys):
            yield key, self.tokens(first + position), self._decode(shard, position)

    def target_index(self, shard: int) -> ShardIndex:
        """The cache shard's member index, checked key by key against its token shard."""
        with self._target_lock:
            found = self._target_indexes.get(shard)
            if found is not None:
                return found
            tokens = self.index(shard)
            path = self.cache_paths[shard]
            found = index_shard(path, TARGETS_MEMBER, "cache shard")
            if found.keys != tokens.keys:
                position = next(
                    (n for n, (a, b) in enumerate(zip(found.keys, tokens.keys)) if a != b),
                    min(len(found), len(tokens)),
                )
                raise KDScaleError(
                    f"{path}: sample {position} does not match its token shard (cache has "
                    f"{len(found)} samples, tokens {len(tokens)}); the cache was made for other "
                    "token shards"
                )
            self._target_indexes[shard] = found
            return found

    def _decode(self, shard: int, position: int) -> SparseTargets:
        path = self.cache_paths[shard]
        blob = self.files.read(path, self.target_index(shard), position)
        try:
            return decode(blob, self._codec, self._vocab)
        except KDScaleError as exc:
            raise KDScaleError(f"{path}: sample {position}: {exc}") from None


def open_cache(
    cache_dir: str | Path,
    tokens_dir: str | Path | None = None,
    *,
    vocab_size: int | None = None,
    tokenizer_fingerprint: str | None = None,
    teacher_fingerprint: str | None = None,
    verify: bool = False,
) -> Cache:
    """Open a cache for reading, refusing one that does not fit the given tokens/student."""
    manifest = load_cache_manifest(cache_dir)
    tokens_root = Path(tokens_dir or manifest.tokens_dir)
    tokens = load_tokens_manifest(tokens_root)
    header = manifest.header
    _check("tokens_fingerprint", header.tokens_fingerprint, tokens.fingerprint, cache_dir)
    _check("tokenizer_fingerprint", header.tokenizer_fingerprint, tokenizer_fingerprint, cache_dir)
    _check("teacher_fingerprint", header.teacher_fingerprint, teacher_fingerprint, cache_dir)
    _check("vocab_size", header.vocab_size, vocab_size, cache_dir)
    return Cache(Path(cache_dir), tokens_root, manifest, tokens, verify)


def open_samples(
    tokens_dir: str | Path, tokens: TokensManifest, split: str, cache: Cache | None = None
) -> TokenStore:
    """The samples of ``split``: tokens only, or joined with ``cache``'s targets when given."""
    return cache.split(split) if cache is not None else TokenStore(tokens_dir, tokens, split)
