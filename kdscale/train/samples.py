"""Random access to the samples of one split: token arrays and, beside them, cached targets.

    store = SampleStore(tokens_dir, manifest, "train", cache)   # cache may be None
    ids = store.tokens(i)                                       # np [seq_len + 1]
    targets = store.targets(i)                                  # SparseTargets [1, S, K]

Sample ``i`` of a split is the ``i``-th sample in manifest order (shard by shard). Token and
cache shards are uncompressed tars, so a sample is one ``pread`` at a known offset: each shard's
member offsets are read from its tar headers the first time the shard is touched (headers
only, no data), and the token and cache keys are checked position by position then, so a
cache shard that does not belong to its token shard is refused before any sample of it is
used. Memory stays bounded: per touched shard two offset arrays; open files are capped.
Cached targets are decoded on demand, one sample at a time. Thread-safe.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.cache.codec import decode
from kdscale.cache.reader import Cache
from kdscale.cache.targets import SparseTargets
from kdscale.cache.writer import TARGETS_MEMBER
from kdscale.data.manifest import TokensManifest
from kdscale.data.shards import TOKENS_MEMBER
from kdscale.errors import KDScaleError

_MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class _ShardIndex:
    """Where each sample's member lies in one tar: data offsets and sizes, in stored order."""

    keys: list[str]
    offsets: np.ndarray
    sizes: np.ndarray


def index_tar(path: Path, member: str) -> _ShardIndex:
    """Offsets of the ``<key>.<member>`` entries of a webdataset tar (headers only)."""
    keys, offsets, sizes = [], [], []
    suffix = "." + member
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.isfile() and info.name.endswith(suffix):
                    keys.append(info.name[: -len(suffix)])
                    offsets.append(info.offset_data)
                    sizes.append(info.size)
    except (OSError, tarfile.TarError) as exc:
        raise KDScaleError(f"{path}: cannot index shard ({type(exc).__name__}: {exc})") from None
    return _ShardIndex(keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))


class SampleStore:
    """The samples of one split of a token set, joined with their cache shards when given."""

    def __init__(
        self,
        tokens_root: str | Path,
        manifest: TokensManifest,
        split: str,
        cache: Cache | None = None,
    ) -> None:
        self.split = split
        self._cache = cache
        record = manifest.splits.get(split)
        shards = record.shards if record is not None else []
        self._token_paths = [Path(tokens_root) / s.name for s in shards]
        self._cache_paths = (
            [cache.root / name for name in cache.shard_names(split)] if cache is not None else []
        )
        self._counts = [s.samples for s in shards]
        self._starts = np.cumsum([0, *self._counts])
        self._indexes: dict[tuple[str, int], _ShardIndex] = {}
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def has_targets(self) -> bool:
        """Whether this split has cached teacher targets."""
        return self._cache is not None

    def tokens(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of sample ``i``."""
        shard, local = self._locate(i)
        blob = self._read("tokens", shard, local)
        return np.load(io.BytesIO(blob), allow_pickle=False)

    def targets(self, i: int) -> SparseTargets:
        """The teacher targets ``[1, seq_len, K]`` of sample ``i`` (needs a cache)."""
        assert self._cache is not None, "this SampleStore has no cache"
        shard, local = self._locate(i)
        blob = self._read("targets", shard, local)
        try:
            return decode(blob, self._cache.codec, self._cache.vocab_size)
        except KDScaleError as exc:
            raise KDScaleError(f"{self._cache_paths[shard]}: sample {local}: {exc}") from None

    def close(self) -> None:
        """Close the files this store opened."""
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside the {self.split!r} split of {len(self)}")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def _read(self, kind: str, shard: int, local: int) -> bytes:
        with self._lock:  # also keeps the file open while it is read
            index = self._index(kind, shard)
            path = (self._token_paths if kind == "tokens" else self._cache_paths)[shard]
            offset, size = int(index.offsets[local]), int(index.sizes[local])
            blob = os.pread(self._open(path), size, offset)
        if len(blob) != size:
            raise KDScaleError(f"{path}: truncated (sample {local} ends past the end of file)")
        return blob

    def _index(self, kind: str, shard: int) -> _ShardIndex:
        """The shard's member index, built (and checked against its partner) on first use."""
        found = self._indexes.get((kind, shard))
        if found is not None:
            return found
        tokens = self._indexes.get(("tokens", shard))
        if tokens is None:
            tokens = index_tar(self._token_paths[shard], TOKENS_MEMBER)
            if len(tokens.keys) != self._counts[shard]:
                raise KDScaleError(
                    f"{self._token_paths[shard]}: {len(tokens.keys)} samples, the tokens "
                    f"manifest says {self._counts[shard]}"
                )
            self._indexes[("tokens", shard)] = tokens
        if kind == "tokens":
            return tokens
        targets = index_tar(self._cache_paths[shard], TARGETS_MEMBER)
        if targets.keys != tokens.keys:
            position = next(
                (n for n, (a, b) in enumerate(zip(targets.keys, tokens.keys)) if a != b),
                min(len(targets.keys), len(tokens.keys)),
            )
            raise KDScaleError(
                f"{self._cache_paths[shard]}: sample {position} does not match its token shard "
                f"(cache has {len(targets.keys)} samples, tokens {len(tokens.keys)}); the cache "
                "was made for other token shards"
            )
        self._indexes[("targets", shard)] = targets
        return targets

    def _open(self, path: Path) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._files) >= _MAX_OPEN_FILES:
                _, oldest = self._files.popitem(last=False)
                os.close(oldest)
        self._files[path] = fd
        return fd
