"""One writer per directory: an exclusive lock that a second writer is refused by, in one line.

    with exclusive_directory(Path(cfg.train.out), "train.out", "kdscale train"):
        ...                                   # this process is the directory's only writer

The lock is ``DIR/.lock`` held with ``flock`` (released by the kernel when the holder dies, so a
killed run never blocks the next one) and deleted when the block ends, so nothing is left behind
after success or an error (nor the directory itself, if the lock created it and an error left
it empty: a refused command leaves no trace). A lock file deleted between another process's open and its ``flock``
is detected (the inode no longer matches the path) and taken afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from kdscale.errors import KDScaleError
from kdscale.io import make_directory

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = path.read_text().strip()
        if text:
            return f" (held by {text})"
    return ""


def _make_directory(directory: Path, key: str) -> None:
    try:
        make_directory(directory)
    except KDScaleError as exc:
        raise KDScaleError(f"{key}: {exc}") from None


@contextlib.contextmanager
def exclusive_directory(directory: Path, key: str, command: str) -> Iterator[None]:
    """Be the only ``command`` writing ``directory`` (created if needed) for the block.

    ``key`` names the config key or flag that chose the directory, for the error message.
    """
    created = not directory.exists()
    _make_directory(directory, key)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KDScaleError(
                f"{key}: {directory} is in use by another `{command}`{_holder(path)}; wait for "
                "it to finish or choose another directory"
            ) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder deleted the file we opened: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    except BaseException:
        _release(path, fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if the failed command left it empty
        raise
    _release(path, fd)


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)
