"""The keys of every sample kept so far, for dropping repeated samples: exact, on disk, resumable,
and in memory that does not grow with the number of shards' keys beyond a Bloom filter.

    seen = SeenKeys(state_dir, expected=2_000_000)
    seen.restore(count)             # the first ``count`` keys ever added (a resumed run)
    if seen.add(key_16_bytes): ...  # True when the key is new
    count = seen.sync()             # durable; what a later restore(count) returns to

Files (all under ``root``): ``keys.bin``, every added key (16 bytes) in order — the truth, cut
back to ``count`` keys on restore; ``run-NNNNNN.bin``, the sorted keys of each full block of
``RUN`` keys of ``keys.bin``. Memory: a Bloom filter of every key (about 10 bits each: 100M keys,
the samples of 100k shards of 1024, take 125 MB; at most 256 MB) and the keys of the last, unsorted block (at most
``RUN``). A key the filter has never seen is new (the common case); otherwise the block and every
run are searched exactly (a binary search of ``pread``s per run), so no sample is ever dropped for
a false positive.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

KEY_BYTES = 16
RUN = 1 << 19  # keys per sorted run (8 MiB); also the most keys held in the in-memory block
_HASHES = 7  # Bloom hash functions: ~1% false positives at 10 bits per key
_MASK = (1 << 64) - 1


class SeenKeys:
    """An exact, persistent set of 16-byte sample keys (see the module docstring)."""

    def __init__(self, root: Path, expected: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.bits = int(min(max(10 * expected, 1 << 20), 1 << 31))
        self._bloom = bytearray((self.bits + 7) // 8)  # fast to index one byte at a time
        self.bloom = np.frombuffer(self._bloom, np.uint8)  # the same bytes, for whole blocks
        self.count = 0
        self.block: set[bytes] = set()
        self._keys = open(self.root / "keys.bin", "ab")  # noqa: SIM115 - closed by close()

    def _run_path(self, index: int) -> Path:
        return self.root / f"run-{index:06d}.bin"

    def _positions(self, keys_N2: np.ndarray) -> np.ndarray:
        """Bloom bit positions ``[N, hashes]`` of keys given as two big-endian uint64 halves."""
        h1, h2 = keys_N2[:, 0].astype(np.uint64), keys_N2[:, 1].astype(np.uint64) | np.uint64(1)
        steps = np.arange(_HASHES, dtype=np.uint64)
        return (h1[:, None] + steps[None, :] * h2[:, None]) % np.uint64(self.bits)  # wraps mod 2^64

    def _key_positions(self, key: bytes) -> list[int]:
        h1, h2 = int.from_bytes(key[:8], "big"), int.from_bytes(key[8:], "big") | 1
        return [((h1 + i * h2) & _MASK) % self.bits for i in range(_HASHES)]

    def _mark(self, positions: np.ndarray) -> None:
        positions = positions.ravel()
        bits = (1 << (positions & np.uint64(7))).astype(np.uint8)
        np.bitwise_or.at(self.bloom, positions >> np.uint64(3), bits)

    def restore(self, count: int) -> None:
        """Go back to the first ``count`` keys added (dropping later ones, runs included)."""
        self._keys.close()
        path = self.root / "keys.bin"
        stored = path.stat().st_size // KEY_BYTES
        if stored < count:
            raise AssertionError(f"{path}: {stored} keys, the resume point needs {count}")
        os.truncate(path, count * KEY_BYTES)
        full = count // RUN
        for run in self.root.glob("run-*.bin"):
            if int(run.stem.split("-")[1]) >= full:
                run.unlink()
        self.bloom[:] = 0
        self.block = set()
        with open(path, "rb") as handle:
            for first in range(0, count, RUN):
                block = np.frombuffer(handle.read(min(RUN, count - first) * KEY_BYTES), np.uint8)
                self._mark(self._positions(block.reshape(-1, KEY_BYTES).view(">u8")))
                if first // RUN >= full:  # the last, unsorted block stays in memory
                    self.block = {bytes(row) for row in block.reshape(-1, KEY_BYTES)}
                elif not self._run_path(first // RUN).is_file():
                    self._write_run(first // RUN, block.reshape(-1, KEY_BYTES))
        self.count = count
        self._keys = open(path, "ab")  # noqa: SIM115

    def _write_run(self, index: int, keys_N16: np.ndarray) -> None:
        halves = keys_N16.view(">u8")
        order = np.lexsort((halves[:, 1], halves[:, 0]))
        tmp = self.root / f".run-{index:06d}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(np.ascontiguousarray(keys_N16[order]).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._run_path(index))

    def _in_runs(self, key: bytes) -> bool:
        for index in range(self.count // RUN):
            fd = os.open(self._run_path(index), os.O_RDONLY)
            try:
                lo, hi = 0, RUN
                while lo < hi:
                    mid = (lo + hi) // 2
                    found = os.pread(fd, KEY_BYTES, mid * KEY_BYTES)
                    if found < key:
                        lo = mid + 1
                    elif found > key:
                        hi = mid
                    else:
                        return True
            finally:
                os.close(fd)
        return False

    def add(self, key: bytes) -> bool:
        """Add ``key``; True if it was new, False if it had been added before."""
        positions = self._key_positions(key)
        bloom = self._bloom
        if all(bloom[p >> 3] >> (p & 7) & 1 for p in positions):
            if key in self.block or self._in_runs(key):
                return False
        for p in positions:
            bloom[p >> 3] |= 1 << (p & 7)
        self._keys.write(key)
        self.block.add(key)
        self.count += 1
        if self.count % RUN == 0:  # the block is full: sort it into a run on disk
            keys_N16 = np.frombuffer(b"".join(sorted(self.block)), np.uint8).reshape(-1, KEY_BYTES)
            self._write_run(self.count // RUN - 1, keys_N16)
            self.block = set()
        return True

    def sync(self) -> int:
        """Make every added key durable; returns how many there are."""
        self._keys.flush()
        os.fsync(self._keys.fileno())
        return self.count

    def close(self) -> None:
        """Close the key file."""
        self._keys.close()
