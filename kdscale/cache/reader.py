"""Read a cache in step with its token shards: ``(key, tokens, SparseTargets)`` per sample.

    cache = open_cache("runs/cache", "runs/tokens", vocab_size=49152)
    for key, tokens, targets in cache.iter_split("train"):
        ...

:func:`open_cache` refuses a cache whose fingerprints do not match the token set (or the
student's vocabulary, tokenizer or expected teacher), naming the field that differs. Reading
checks that every cache member has the key of the token sample beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.cache.codec import decode
from kdscale.cache.manifest import CacheManifest, load_cache_manifest
from kdscale.cache.targets import SparseTargets
from kdscale.cache.writer import TARGETS_MEMBER
from kdscale.config.cache import CodecConfig
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.data.shards import iter_shard_members, iter_token_shard
from kdscale.errors import KDScaleError


def _check(field: str, cache_value: object, expected: object, cache_dir: str | Path) -> None:
    if expected is not None and cache_value != expected:
        raise KDScaleError(
            f"{field}: cache {cache_dir} has {cache_value!r}, expected {expected!r}; the cache was "
            "made for other inputs (re-run `kdscale cache` for these)"
        )


def iter_cache_members(path: str | Path, sha256: str | None = None) -> Iterator[tuple[str, bytes]]:
    """``(key, codec blob)`` of one cache shard in stored order; damage raises naming the file."""
    return iter_shard_members(path, TARGETS_MEMBER, "cache shard", sha256)


@dataclass
class Cache:
    """An opened, validated cache and the token set it belongs to."""

    root: Path
    tokens_root: Path
    manifest: CacheManifest
    tokens: TokensManifest
    verify: bool = False

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

    def iter_shard(self, name: str) -> Iterator[tuple[str, np.ndarray, SparseTargets]]:
        """Samples of one shard pair, keys checked position by position."""
        token_rec = next(s for split in self.tokens.splits.values() for s in split.shards if s.name == name)
        cache_rec = self.manifest.shards[name]
        token_path, cache_path = self.tokens_root / name, self.root / name
        codec, vocab = self.codec, self.vocab_size
        tokens = iter_token_shard(token_path, token_rec.sha256 if self.verify else None)
        members = iter_cache_members(cache_path, cache_rec.sha256 if self.verify else None)
        count = 0
        for count, ((key, ids), (cache_key, blob)) in enumerate(_zip_strict(tokens, members, name), 1):
            if key != cache_key:
                raise KDScaleError(
                    f"{cache_path}: sample {count} has key {cache_key}, its token shard has {key}"
                )
            try:
                targets = decode(blob, codec, vocab)
            except KDScaleError as exc:
                raise KDScaleError(f"{cache_path}: sample {key}: {exc}") from None
            yield key, ids, targets
        if count != cache_rec.samples:
            raise KDScaleError(f"{cache_path}: {count} samples, the manifest says {cache_rec.samples}")

    def iter_split(self, split: str) -> Iterator[tuple[str, np.ndarray, SparseTargets]]:
        """Every sample of ``split`` in stored order."""
        for name in self.shard_names(split):
            yield from self.iter_shard(name)


def _zip_strict(tokens: Iterator, members: Iterator, name: str) -> Iterator[tuple]:
    sentinel = object()
    while True:
        a, b = next(tokens, sentinel), next(members, sentinel)
        if a is sentinel and b is sentinel:
            return
        if a is sentinel or b is sentinel:
            longer = "cache" if a is sentinel else "token"
            raise KDScaleError(f"{name}: the {longer} shard has more samples than its partner")
        yield a, b


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
