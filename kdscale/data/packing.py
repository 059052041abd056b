"""Pack a stream of documents into fixed ``seq_len + 1`` samples.

Documents are joined by a separator id and cut into windows of ``seq_len + 1`` tokens with a
stride of ``seq_len`` (each window's last token is the next window's first, so every token
is a label exactly once). The tail shorter than a window is dropped and counted.
"""

from __future__ import annotations

import numpy as np


class Packer:
    """Accumulates documents and emits full samples as they complete."""

    def __init__(self, seq_len: int, separator_id: int | None, buffer: np.ndarray | None = None):
        self.sample_len = seq_len + 1
        self.stride = seq_len
        self.separator_id = separator_id
        self._buffer = np.empty(0, dtype=np.int64) if buffer is None else buffer.astype(np.int64)

    def add(self, ids: np.ndarray) -> list[np.ndarray]:
        """Append one document; return every sample it completes."""
        parts = [self._buffer, ids]
        if self.separator_id is not None and (len(ids) == 0 or ids[-1] != self.separator_id):
            parts.append(np.array([self.separator_id], dtype=np.int64))
        self._buffer = np.concatenate(parts)
        n_full = (len(self._buffer) - 1) // self.stride if len(self._buffer) >= self.sample_len else 0
        samples = [self._buffer[i * self.stride : i * self.stride + self.sample_len] for i in range(n_full)]
        if n_full:
            self._buffer = self._buffer[n_full * self.stride :].copy()
        return samples

    @property
    def buffer(self) -> np.ndarray:
        """The tokens not yet emitted (what a resumed packer starts from)."""
        return self._buffer

    @property
    def leftover(self) -> int:
        """Tokens still buffered (dropped if no more documents arrive)."""
        return max(len(self._buffer) - 1, 0)
