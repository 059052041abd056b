"""Log-probability quantization whose step grows for unlikely tokens (sqrt companding).

With ``x = -log p`` the level is ``round(G(x))`` where, for ``q = quant_step`` and
``Q = quant_step_max``::

    G(x) = (2 / q) * (1 - exp(-x / 2))          for x <= x_c = 2 ln(Q / q)
    G(x) = G(x_c) + (x - x_c) / Q               beyond

so the step in nats is ``q / sqrt(p)``, capped at ``Q`` (``Q == q`` gives uniform log steps).
A relative error ``e_i`` in ``p_i`` costs about ``p_i e_i^2 / 2`` of KL, so every kept entry
contributes at most about ``q^2 / 8``: for the default ``q = 0.01`` and 64 entries plus the
tail, KL(exact top-k ‖ decoded) <= ~8e-4 nats per position whatever the distribution.
``-log p`` is clamped at ``X_MAX`` (p ~ 1.6e-28); one extra level encodes ``p = 0``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

X_MAX = 64.0


class LogProbQuantizer:
    """Maps log-probs to integer levels ``0..zero_level`` and back."""

    def __init__(self, step: float, step_max: float) -> None:
        assert 0 < step <= step_max
        self.step, self.step_max = step, step_max
        self._x_c = 2.0 * math.log(step_max / step)
        self._g_c = (2.0 / step) * (1.0 - step / step_max)
        self.zero_level = int(np.rint(self._companded(np.array([X_MAX]))[0])) + 1
        levels = np.arange(self.zero_level, dtype=np.float64)
        x = np.where(
            levels <= self._g_c,
            -2.0 * np.log(np.maximum(1.0 - levels * step / 2.0, step / step_max)),
            self._x_c + (levels - self._g_c) * step_max,
        )
        self._table = np.append(-x, -np.inf)  # level -> log p; zero_level -> -inf
        self._prob = np.exp(self._table)

    def _companded(self, x: np.ndarray) -> np.ndarray:
        return np.where(
            x <= self._x_c,
            (2.0 / self.step) * -np.expm1(-x / 2.0),
            self._g_c + (x - self._x_c) / self.step_max,
        )

    def levels(self, logp: np.ndarray) -> np.ndarray:
        """Integer levels of ``logp`` (<= 0; ``-inf`` maps to :attr:`zero_level`)."""
        logp = np.asarray(logp, dtype=np.float64)
        x = np.clip(-logp, 0.0, X_MAX)
        out = np.rint(self._companded(x)).astype(np.int64)
        out[np.isneginf(logp)] = self.zero_level
        return out

    def logp(self, levels: np.ndarray) -> np.ndarray:
        """The log-prob each level stands for (float64; ``-inf`` for :attr:`zero_level`)."""
        return self._table[levels]

    def prob(self, levels: np.ndarray) -> np.ndarray:
        """``exp(logp(levels))`` from a table."""
        return self._prob[levels]


@functools.lru_cache(maxsize=16)
def quantizer(step: float, step_max: float) -> LogProbQuantizer:
    """The (cached) quantizer for a step pair."""
    return LogProbQuantizer(step, step_max)
