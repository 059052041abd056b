"""Fixed-width unsigned integers as byte planes, and vectorised ragged-array helpers.

A stream of ``bits``-wide integers is stored as ``bits // 8`` byte planes (all low bytes, then
all next bytes, ...) followed by ``bits % 8`` bit planes (bit ``j`` of every value, packed 8
to a byte). That is ``bits`` bits per value (plus padding to a byte per bit plane); planes
keep bytes aligned so that a general compressor (zstandard) can model each plane's
statistics, and an all-zero high plane costs next to nothing once compressed.
"""

from __future__ import annotations

import numpy as np

from kdscale.errors import KDScaleError


def bits_for(max_value: int) -> int:
    """Bits needed to store every integer in ``[0, max_value]`` (0 when ``max_value`` is 0)."""
    return int(max_value).bit_length()


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_uint` writes for ``count`` values of ``bits`` bits."""
    return count * (bits // 8) + (bits % 8) * ((count + 7) // 8)


def pack_uint(values: np.ndarray, bits: int) -> bytes:
    """Serialize non-negative integers ``< 2**bits`` as byte planes, then bit planes."""
    v = np.ascontiguousarray(values, dtype=np.uint32).ravel()
    assert bits <= 32 and (v.size == 0 or int(v.max()) < (1 << bits)), (bits, v.max(initial=0))
    parts = [(v >> np.uint32(8 * j)).astype(np.uint8).tobytes() for j in range(bits // 8)]
    for j in range(8 * (bits // 8), bits):
        plane = ((v >> np.uint32(j)) & np.uint32(1)).astype(np.uint8)
        parts.append(np.packbits(plane, bitorder="little").tobytes())
    return b"".join(parts)


class StreamReader:
    """Reads consecutive :func:`pack_uint` streams out of one buffer; overruns are errors."""

    def __init__(self, buf: bytes, what: str) -> None:
        self._buf = np.frombuffer(buf, dtype=np.uint8)
        self._pos = 0
        self._what = what

    def take(self, count: int, bits: int) -> np.ndarray:
        """The next ``count`` values of width ``bits`` as int64."""
        size = packed_size(count, bits)
        if self._pos + size > self._buf.size:
            raise KDScaleError(f"{self._what}: truncated payload (need {size} more bytes)")
        chunk = self._buf[self._pos : self._pos + size]
        self._pos += size
        full = bits // 8
        out = chunk[:count].astype(np.int64) if full else np.zeros(count, dtype=np.int64)
        for j in range(1, full):
            out |= chunk[j * count : (j + 1) * count].astype(np.int64) << (8 * j)
        if bits % 8:
            plane_bytes, top = (count + 7) // 8, np.zeros(count, dtype=np.uint8)
            for j in range(bits % 8):
                plane = chunk[full * count + j * plane_bytes :][:plane_bytes]
                top |= np.unpackbits(plane, count=count, bitorder="little") << np.uint8(j)
            out |= top.astype(np.int64) << (8 * full)
        return out

    def finish(self) -> None:
        """Check that every byte was consumed."""
        if self._pos != self._buf.size:
            raise KDScaleError(
                f"{self._what}: {self._buf.size - self._pos} unexpected trailing payload bytes"
            )


def segment_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums of non-negative ``values`` that restart wherever ``starts`` is True.

    With non-negative values the running total never decreases, so the total before the
    latest segment start is a running maximum (no gather over segment ids is needed).
    """
    total = np.cumsum(values, dtype=np.int64)
    return total - np.maximum.accumulate(np.where(starts, total - values, 0))


def first_of_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``counts`` (>= 1) entries laid end to end: row offsets, and a mask of each
    row's first entry."""
    offsets = np.cumsum(counts) - counts
    first = np.zeros(int(counts.sum()), dtype=bool)
    first[offsets] = True
    return offsets, first
