"""Random access to the members of webdataset shards: an index of each tar's headers, then one
``pread`` per member.

Token and cache shards are uncompressed tars of ``<key>.<member>`` entries. :func:`index_shard`
reads a shard's headers only (no data) and returns the keys with their data offsets and sizes;
:class:`ShardFiles` keeps a bounded set of open files and reads a member's bytes at its offset.
Both kinds of shard are read only this way: no decoder runs on a member's bytes here, so nothing
in a shard is ever unpickled or executed (callers turn bytes into arrays themselves).

Indexing is also where a shard's structure is checked (headers only, once per shard per
reader): every entry must be a regular file named ``<key>.<member>`` with a plain key (letters,
digits, ``_``, ``-``: no path separator, ``..``, absolute path or control character) that
appears once. A shard holding anything else (an extra ``.pyd``/``.pth`` member, a link, a
directory) is refused, naming the entry.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdscale.errors import KDScaleError

_MAX_OPEN_FILES = 64
PLAIN_KEY = re.compile(r"[0-9A-Za-z_-]{1,200}")


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample's member lies in one tar: keys, data offsets and sizes, in stored order."""

    keys: list[str]
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def _key_of(info: tarfile.TarInfo, suffix: str, path: Path, what: str) -> str:
    """The key of a ``<key><suffix>`` entry; anything else refuses the shard, naming the entry."""
    key = info.name[: -len(suffix)] if info.name.endswith(suffix) else None
    if not info.isfile() or key is None or not PLAIN_KEY.fullmatch(key):
        kind = "a regular file" if info.isfile() else "not a regular file"
        raise KDScaleError(
            f"{path}: entry {info.name!r} ({kind}) is not a kdscale {what} member "
            f"(<key>{suffix} with a plain key); refusing the shard"
        )
    return key


def index_shard(path: str | Path, member: str, what: str) -> ShardIndex:
    """The ``<key>.<member>`` entries of a webdataset tar, from its headers (no data is read).

    A missing, structurally damaged or foreign file (any other entry, a key that is not plain
    or appears twice) raises :class:`KDScaleError` naming it and ``what`` (e.g. "token shard").
    """
    path = Path(path)
    if not path.is_file():
        raise KDScaleError(f"{what} {str(path)!r} is missing")
    keys, offsets, sizes = [], [], []
    suffix = "." + member
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                keys.append(_key_of(info, suffix, path, what))
                offsets.append(info.offset_data)
                sizes.append(info.size)
    except (OSError, tarfile.TarError, UnicodeError) as exc:
        raise KDScaleError(f"{path}: damaged {what} ({type(exc).__name__}: {exc})") from None
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise KDScaleError(f"{path}: key {twice!r} appears twice in this {what}; refusing the shard")
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
