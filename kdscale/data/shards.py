"""Token shards: webdataset tars of packed samples keyed by a hash of their bytes.

Each sample is one member ``<key>.tokens.npy``: a little-endian integer array of ``seq_len + 1``
ids. The key is the blake2b-128 hex digest of the array's bytes, so the same tokens always get
the same key, whatever run, shard or order produced them. Tar headers carry fixed times and
owners, so the same inputs give byte-identical shards.

Every reader checks each sample it decodes against its key (:func:`decode_sample`): a flipped
token id is named, never trained on or evaluated. The check is one blake2b of the sample's
bytes (measured in ``tools/bench/bench_integrity.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kdscale.data.manifest import ShardRecord
from kdscale.data.tarindex import ShardFiles, index_shard
from kdscale.errors import KDScaleError
from kdscale.io import fsync_dir, sha256_file

TOKENS_MEMBER = "tokens.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sample_key(tokens: np.ndarray) -> str:
    """Content key of a sample: blake2b-128 of its little-endian bytes."""
    return hashlib.blake2b(tokens.tobytes(), digest_size=16).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class TokenShardWriter:
    """Writes one split's ``<prefix>-NNNNNN.tar`` shards, sample by sample.

    A shard grows in a hidden partial file (``.<name>.partial``); once it holds ``shard_samples``
    samples (or at :meth:`close`) it is finished, fsynced, renamed to its name and handed to
    ``commit``, which records it in the manifest. :meth:`sync` makes the partial file durable and
    says where it stands, so a stopped run can :meth:`start` again at that point. The bytes are
    those of a webdataset ``TarWriter`` with fixed times and owners, however often the shard was
    resumed.
    """

    def __init__(
        self,
        out_dir: Path,
        prefix: str,
        shard_samples: int,
        dtype: np.dtype,
        commit: Callable[[ShardRecord], None],
    ):
        self.out_dir = out_dir
        self.prefix = prefix
        self.shard_samples = shard_samples
        self.dtype = dtype
        self.commit = commit
        self.index = 0  # the shard being written
        self.count = 0  # samples in it so far
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None

    def name(self, index: int) -> str:
        """The file name of shard ``index``."""
        return f"{self.prefix}-{index:06d}.tar"

    def partial_path(self, index: int) -> Path:
        """Where shard ``index`` grows until it is committed."""
        return self.out_dir / f".{self.name(index)}.partial"

    def start(self, index: int, length: int = 0, samples: int = 0) -> None:
        """Write shard ``index`` next; with ``length``, continue its partial file after its first
        ``length`` bytes, which hold ``samples`` samples (anything after them is dropped)."""
        assert self._file is None
        self.index, self.count = index, samples
        if length:
            self._open(index, "r+b")
            self._file.truncate(length)
            self._file.seek(length)
            self._tar = tarfile.TarFile(fileobj=self._file, mode="w")

    def _open(self, index: int, mode: str) -> None:
        self._file = open(self.partial_path(index), mode)  # noqa: SIM115 - closed by _finish

    def write(self, key: str, tokens: np.ndarray) -> None:
        """Append one sample (already converted to the shard dtype)."""
        if self._file is None:
            self._open(self.index, "wb")
            self._tar = tarfile.TarFile(fileobj=self._file, mode="w")
        data = _npy_bytes(tokens)
        info = tarfile.TarInfo(f"{key}.{TOKENS_MEMBER}")
        info.size, info.mtime, info.mode = len(data), 0.0, 0o444
        info.uname = info.gname = "bigdata"  # webdataset's TarWriter defaults
        with self._aborted_on_failure():
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count == self.shard_samples:
            self._finish()

    def sync(self) -> tuple[int, int, int]:
        """Flush the partial shard to disk; ``(shard index, bytes, samples)`` written so far."""
        if self._file is None:
            return self.index, 0, self.count
        with self._aborted_on_failure():
            self._file.flush()
            os.fsync(self._file.fileno())
        return self.index, self._file.tell(), self.count

    def _finish(self) -> None:
        assert self._file is not None and self._tar is not None
        with self._aborted_on_failure():
            self._tar.close()  # end-of-archive blocks; the file stays open
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._file = self._tar = None
        path = self.out_dir / self.name(self.index)
        os.replace(self.partial_path(self.index), path)
        fsync_dir(self.out_dir)
        size, digest = path.stat().st_size, sha256_file(path)
        self.commit(ShardRecord(name=path.name, samples=self.count, bytes=size, sha256=digest))
        self.index, self.count = self.index + 1, 0

    def close(self) -> None:
        """Finish and commit the open shard, if it holds any sample."""
        if self._file is not None:
            self._finish()

    @contextlib.contextmanager
    def _aborted_on_failure(self) -> Iterator[None]:
        """A failed write (a full disk) drops the open partial shard, so that no finalizer
        flushes it into the disk again later; a resumed run truncates it to its last sync."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = self._tar = None
            raise


def decode_tokens(blob: bytes, where: str) -> np.ndarray:
    """The token array of one ``tokens.npy`` member (no pickle); a damaged one names ``where``."""
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError) as exc:  # MemoryError: a huge shape
        raise KDScaleError(f"{where}: damaged {TOKENS_MEMBER} member ({exc})") from None


def decode_sample(
    blob: bytes, key: str, where: str, dtype: np.dtype | None = None, length: int | None = None
) -> np.ndarray:
    """The tokens of one member, checked: a 1-D unsigned array (of ``dtype`` and ``length``
    when given) whose content hash equals its ``key``; anything else names ``where``."""
    tokens = decode_tokens(blob, where)
    if (
        tokens.ndim != 1
        or tokens.dtype.kind != "u"
        or (dtype is not None and tokens.dtype != dtype)
        or (length is not None and len(tokens) != length)
    ):
        want = f"{np.dtype(dtype).str if dtype is not None else 'unsigned'}[{length or 'n'}]"
        raise KDScaleError(
            f"{where}: {TOKENS_MEMBER} holds {tokens.dtype.str}{list(tokens.shape)}, the token set "
            f"has {want}; the shard is damaged"
        )
    if sample_key(tokens) != key:
        raise KDScaleError(
            f"{where}: the tokens do not match their key {key} (a content hash): the shard is "
            "corrupt; re-run `kdscale data` or restore it"
        )
    return tokens


def check_sha256(path: str | Path, sha256: str, what: str) -> None:
    """Refuse a file whose bytes differ from the manifest's sha256 (or that is missing)."""
    path = Path(path)
    if not path.is_file():
        raise KDScaleError(f"{what} {str(path)!r} is missing")
    if sha256_file(path) != sha256:
        raise KDScaleError(f"{what} {str(path)!r} is corrupt: sha256 differs from the manifest")


def shard_problems(root: str | Path, records: list, what: str) -> list[str]:
    """One line per shard of ``records`` (manifest records: ``name``, ``sha256``) under ``root``
    that is missing or whose bytes differ from its recorded sha256."""
    problems = []
    for record in records:
        try:
            check_sha256(Path(root) / record.name, record.sha256, what)
        except KDScaleError as exc:
            problems.append(str(exc))
    return problems


def iter_token_shard(path: str | Path, sha256: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, tokens)`` of one token shard in stored order, each checked against its key; with
    ``sha256`` (from the manifest) any changed byte is caught before a sample is read."""
    if sha256 is not None:
        check_sha256(path, sha256, "token shard")
    index = index_shard(path, TOKENS_MEMBER, "token shard")
    files = ShardFiles()
    try:
        for position, key in enumerate(index.keys):
            blob = files.read(Path(path), index, position)
            yield key, decode_sample(blob, key, f"{path}: sample {position}")
    finally:
        files.close()
