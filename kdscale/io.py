"""Atomic file and directory writes, checked reads of small text files, and content hashes.

A reader never sees a half-written file: data goes to a temporary name in the same directory,
is fsynced, then renamed over the final name (rename is atomic on POSIX). A small file kdscale
reads back (a manifest, a config, ``train_state.json``) that is missing, unreadable, not UTF-8
or not valid JSON/YAML is one :class:`~kdscale.errors.KDScaleError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from kdscale.errors import KDScaleError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; published outputs get the usual modes.
_FILE_MODE = 0o666 & ~_current_umask()
_DIR_MODE = 0o777 & ~_current_umask()


def make_directory(path: str | os.PathLike[str]) -> None:
    """``mkdir -p path``; a path under a plain file, or one that cannot be created, is one
    :class:`KDScaleError` naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise KDScaleError(
            f"cannot create directory {str(path)!r}: {str(blocker)!r} is a file, not a directory"
        ) from None
    except OSError as exc:
        raise KDScaleError(f"cannot create directory {str(path)!r}: {exc.strerror}") from None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing; it appears under its name only if the block succeeds.

    ``mode``: its permission bits (default: 0666 less the umask; 0o600 for a private file).
    """
    final = Path(path)
    make_directory(final.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        os.fchmod(fd, _FILE_MODE if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (``mode``: as :func:`atomic_open`)."""
    with atomic_open(path, mode) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``mode``: as :func:`atomic_open`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of a small file; a missing, unreadable or non-UTF-8 one names ``what``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KDScaleError(f"{what} {str(path)!r} is missing") from None
    except UnicodeDecodeError as exc:
        raise KDScaleError(
            f"{what} {str(path)!r} is damaged: not UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise KDScaleError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """A small JSON file's value; damage (truncation, a flipped byte) is one error naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KDScaleError(f"{what} {str(path)!r} is damaged: not valid JSON ({exc.msg} at "
                           f"line {exc.lineno})") from None


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """A small YAML file's value (safe loader: plain data only); damage names the file."""
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise KDScaleError(f"{what} {str(path)!r} is damaged: not valid YAML ({problem})") from None


def temp_directory(final: str | os.PathLike[str]) -> Path:
    """A new hidden directory beside ``final`` (``.NAME.XXXX.tmp``), unique to this caller, with
    the usual directory mode: where ``final`` is built before it is renamed into place."""
    final = Path(final)
    make_directory(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, _DIR_MODE)
    return tmp


_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


@contextlib.contextmanager
def removed_on_failure(tmp: str | os.PathLike[str]) -> Iterator[None]:
    """Delete ``tmp`` (a save's temporary directory) if the block fails: a full disk gets its
    space back, and nothing half-written stays behind. Checkpoint writers (torch, megatron)
    report a full disk as assorted errors without an errno, so a failure that leaves less than
    1 MiB free on ``tmp``'s file system is reported as what it is, in one line."""
    try:
        yield
    except BaseException as exc:
        full = not isinstance(exc, (KeyboardInterrupt, KDScaleError)) and _free_bytes(tmp) < _NEARLY_FULL
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise KDScaleError(
                f"no space left on device writing {str(tmp)!r}: free space (or choose another "
                "output directory), then run the same command again"
            ) from exc
        raise


def _free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes available on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; it replaces ``path`` only if the block succeeds.

    On failure the temporary directory is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = temp_directory(final)
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
