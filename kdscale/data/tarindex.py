"""Random access to the members of webdataset shards: an index of each tar's headers, then one
``pread`` per member.

Token and cache shards are uncompressed tars of ``<key>.<member>`` entries. :func:`index_shard`
reads a shard's headers only (no data) and returns the keys with their data offsets and sizes;
:class:`ShardFiles` keeps a bounded set of open files and reads a member's bytes at its offset.
Both kinds of shard are read only this way: no decoder runs on a member's bytes here, so nothing
in a shard is ever unpickled or executed (callers turn bytes into arrays themselves).
"""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.errors import KDScaleError

_MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's member lies in one tar: keys, data offsets and sizes, in stored order."""

    keys: list[str]
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def index_shard(path: str | Path, member: str, what: str) -> ShardIndex:
    """The ``<key>.<member>`` entries of a webdataset tar, from its headers (no data is read).

    A missing or structurally damaged file raises :class:`KDScaleError` naming it and ``what``
    (e.g. "token shard").
    """
    path = Path(path)
    if not path.is_file():
        raise KDScaleError(f"{what} {str(path)!r} is missing")
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
        raise KDScaleError(f"{path}: damaged {what} ({type(exc).__name__}: {exc})") from None
    return ShardIndex(keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64))


class ShardFiles:
    """Reads member bytes at known offsets, keeping at most 64 files open. Thread-safe."""

    def __init__(self) -> None:
        self._files: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: Path, index: ShardIndex, position: int) -> bytes:
        """The bytes of the ``position``-th indexed member of ``path``."""
        offset, size = int(index.offsets[position]), int(index.sizes[position])
        with self._lock:  # also keeps the file open while it is read
            blob = os.pread(self._open(path), size, offset)
        if len(blob) != size:
            raise KDScaleError(f"{path}: truncated (sample {position} ends past the end of file)")
        return blob

    def close(self) -> None:
        """Close every file this reader opened."""
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def _open(self, path: Path) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._files) >= _MAX_OPEN_FILES:
                _, oldest = self._files.popitem(last=False)
                os.close(oldest)
        self._files[path] = fd
        return fd
