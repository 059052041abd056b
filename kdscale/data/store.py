"""Random access to the token samples of one split.

    store = TokenStore(tokens_dir, manifest, "train")
    ids = store.tokens(i)              # np [seq_len + 1], the i-th sample in manifest order

Sample ``i`` is the ``i``-th sample in manifest order (shard by shard). Each shard is indexed
the first time it is touched (headers only, checked against the manifest's sample count); a
sample is then one ``pread``, and its tokens are checked against their key (content hash),
dtype and length before they are returned. Memory stays bounded: one offset array per touched shard, a
bounded set of open files. Thread-safe. The token ↔ cache join built on it is
:class:`kdscale.cache.reader.CachedSplit`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from kdscale.data.manifest import TokensManifest
from kdscale.data.shards import TOKENS_MEMBER, decode_sample
from kdscale.data.tarindex import ShardFiles, ShardIndex, index_shard
from kdscale.errors import KDScaleError


class TokenStore:
    """The samples of one split of a token set (an unknown split is empty)."""

    has_targets = False

    def __init__(self, tokens_root: str | Path, manifest: TokensManifest, split: str) -> None:
        self.split = split
        record = manifest.splits.get(split)
        shards = record.shards if record is not None else []
        self.names = [s.name for s in shards]
        self.paths = [Path(tokens_root) / name for name in self.names]
        self._counts = [s.samples for s in shards]
        self._dtype, self._length = np.dtype(manifest.dtype), manifest.seq_len + 1
        self._starts = np.cumsum([0, *self._counts])
        self._indexes: dict[int, ShardIndex] = {}
        self._index_lock = threading.Lock()
        self.files = ShardFiles()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, position in shard)`` of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside the {self.split!r} split of {len(self)}")
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return shard, i - int(self._starts[shard])

    def index(self, shard: int) -> ShardIndex:
        """The member index of token shard ``shard`` (built and checked on first use)."""
        with self._index_lock:
            found = self._indexes.get(shard)
            if found is None:
                found = index_shard(self.paths[shard], TOKENS_MEMBER, "token shard")
                if len(found) != self._counts[shard]:
                    raise KDScaleError(
                        f"{self.paths[shard]}: {len(found)} samples, the tokens manifest says "
                        f"{self._counts[shard]}"
                    )
                self._indexes[shard] = found
            return found

    def tokens(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` token ids of sample ``i`` (checked against their key)."""
        shard, position = self.locate(i)
        path, index = self.paths[shard], self.index(shard)
        blob = self.files.read(path, index, position)
        return decode_sample(
            blob, index.keys[position], f"{path}: sample {position}", self._dtype, self._length
        )

    def close(self) -> None:
        """Close the files this store opened."""
        self.files.close()
