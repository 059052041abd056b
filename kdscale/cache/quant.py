"""Log-probability quantization: a step that grows for unlikely tokens, chosen per support size.

With ``x = -log p``, the step in nats at probability ``p`` is ``s(p) = min(Q, max(a, b / sqrt(p)))``
and the level is ``round(G(x))`` with ``G' = 1 / s``, ``G(0) = 0``::

    G(x) = x / a                                           x <= x_a = 2 ln(a / b)  (if a > b)
    G(x) = G(x_a) + (2 / b) (exp(-x_a / 2) - exp(-x / 2))  x <= x_c = 2 ln(Q / b)
    G(x) = G(x_c) + (x - x_c) / Q                          beyond

``-log p`` is clamped at ``X_MAX`` (p ~ 1.6e-28); one extra level encodes ``p = 0``.

Error. Rounding moves ``log p_i`` by at most half a step; after the decoder renormalizes,
KL(exact ‖ decoded) ≈ Var_p(error) / 2 <= Σ p_i s_i² / 8 (second order in the error; the
growth of the step within one cell is ignored, as in every figure below). Per entry
``p s² <= p a² + b²`` and ``<= p Q²``, so over ``n`` entries (the support plus the tail
bucket) whatever the distribution::

    KL <= min(a² + n b², Q²) / 8

- **Sqrt law** (``a = 0``, ``b = quant_step``, ``Q = quant_step_max``): ``n q² / 8``. The default
  ``q = 0.01`` gives 8.1e-4 for top-64, but 0.05 for top-4096 and 0.125 (the ``Q`` cap) for the
  49,152 entries of a full SmolLM2 distribution: on SmolLM2 outputs top-256 already measures
  1.3e-3 and the full vocabulary 1.1e-2 at worst.
- **Flat law**, used when the sqrt law's bound exceeds :data:`KL_BOUND`: ``a = 2 sqrt(KL_DESIGN)``
  and ``b = a / sqrt(n)``. Entries with ``p >= 1/n`` get the flat step ``a`` (together <= a²),
  the rest grow as ``b / sqrt(p)`` (<= b² each, n b² = a² together): KL <= a² / 4 = KL_DESIGN,
  the design figure of the default top-64, for any distribution over any number of entries. The
  flat region costs ~ln(n) / a levels (~270 in all for n = 49,153, 2 bytes per level).
"""

from __future__ import annotations

import functools
import math

import numpy as np

X_MAX = 64.0
KL_BOUND = 1e-3  # the quantization error a cache promises per position (nats, approximate)
KL_DESIGN = 8e-4  # what the flat law is built for: the default top-64 figure, 20% below the bound


class LogProbQuantizer:
    """Maps log-probs to integer levels ``0..zero_level`` and back.

    ``step`` is ``b`` (the step at ``p = 1`` when there is no flat region), ``step_max`` is
    ``Q`` and ``flat`` is ``a``.
    """

    def __init__(self, step: float, step_max: float, flat: float = 0.0) -> None:
        assert 0 < step <= step_max and flat <= step_max
        self.step, self.step_max = step, step_max
        self.flat = flat if flat > step else 0.0  # a <= b: the sqrt law already covers p <= 1
        if self.flat:
            self._x_a = 2.0 * math.log(self.flat / step)
            self._g_a, self._e_a = self._x_a / self.flat, step / self.flat
        else:  # the exact expressions of the sqrt law (its levels must not change)
            self._x_a, self._g_a, self._e_a = 0.0, 0.0, 1.0
        self._x_c = 2.0 * math.log(step_max / step)
        self._g_c = self._g_a + (2.0 / step) * (self._e_a - step / step_max)
        self.zero_level = int(np.rint(self._companded(np.array([X_MAX]))[0])) + 1
        levels = np.arange(self.zero_level, dtype=np.float64)
        e_x = self._e_a - (levels - self._g_a) * step / 2.0  # exp(-x / 2) in the sqrt region
        x = np.where(
            levels <= self._g_c,
            -2.0 * np.log(np.maximum(e_x, step / step_max)),
            self._x_c + (levels - self._g_c) * step_max,
        )
        if self.flat:
            x = np.where(levels <= self._g_a, levels * self.flat, x)
        self._table = np.append(-x, -np.inf)  # level -> log p; zero_level -> -inf
        self._prob = np.exp(self._table)

    def _companded(self, x: np.ndarray) -> np.ndarray:
        out = np.where(
            x <= self._x_c,
            self._g_a + (2.0 / self.step) * self._e_a * -np.expm1(-(x - self._x_a) / 2.0),
            self._g_c + (x - self._x_c) / self.step_max,
        )
        return np.where(x <= self._x_a, x / self.flat, out) if self.flat else out

    def kl_bound(self, entries: int) -> float:
        """The approximate worst-case KL(exact ‖ decoded) over ``entries`` categories."""
        return min(self.flat**2 + entries * self.step**2, self.step_max**2) / 8.0

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
def quantizer(step: float, step_max: float, flat: float = 0.0) -> LogProbQuantizer:
    """The (cached) quantizer for a step law."""
    return LogProbQuantizer(step, step_max, flat)


def quantizer_for(step: float, step_max: float, support: int) -> LogProbQuantizer:
    """The quantizer for positions of up to ``support`` kept ids plus the tail: the sqrt law of
    ``(step, step_max)`` while its bound holds, else the flat law (module docstring)."""
    entries = support + 1
    plain = quantizer(step, step_max)
    if plain.kl_bound(entries) <= KL_BOUND:
        return plain
    flat = 2.0 * math.sqrt(KL_DESIGN)  # < step_max here: the Q² / 8 cap exceeds KL_BOUND
    return quantizer(flat / math.sqrt(entries), step_max, flat)
