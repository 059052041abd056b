"""The KD weight α over training, and the checks that tie the loss config to its cache and step.

    alpha = kd_weight_at(cfg, step, total_steps)        # once per optimizer step
    out = kd_lm_loss(logits, targets, labels, cfg, kd_weight=alpha)
"""

from __future__ import annotations

import math

from kdscale.config.loss import RENORM_COLLAPSE_NOTE, KDLossConfig
from kdscale.errors import KDScaleError


def kd_weight_at(cfg: KDLossConfig, step: int, total_steps: int) -> float:
    """α at ``step`` of ``total_steps`` (steps ``0 .. total_steps - 1``) under ``cfg.schedule``.

    ``linear`` runs from ``schedule.start`` at step 0 to ``kd_weight`` at the last step; ``wsd``
    warms up ``start → kd_weight``, holds, then decays ``kd_weight → end`` so that the last step
    is exactly ``end``. Steps past the end keep the final value.
    """
    if total_steps < 1 or step < 0:
        raise ValueError(
            f"kd_weight_at: need step >= 0 and total_steps >= 1, got {step}/{total_steps}"
        )
    sched = cfg.schedule
    if sched.kind == "constant":
        return cfg.kd_weight
    if sched.kind == "linear":
        warmup, decay = 1.0, 0.0
    else:
        warmup, decay = sched.warmup_fraction, sched.decay_fraction
    x = min(step / max(total_steps - 1, 1), 1.0)
    if x < warmup:
        return sched.start + (cfg.kd_weight - sched.start) * x / warmup
    if decay > 0.0 and x > 1.0 - decay:
        return cfg.kd_weight + (sched.end - cfg.kd_weight) * (x - (1.0 - decay)) / decay
    return cfg.kd_weight


def resolve_kd_weight(cfg: KDLossConfig, kd_weight: float | None) -> float:
    """The α to use for one call: ``kd_weight`` if given, else the constant ``cfg.kd_weight``."""
    if kd_weight is None:
        if cfg.schedule.kind != "constant":
            raise ValueError(
                f"loss.schedule.kind={cfg.schedule.kind!r}: pass "
                "kd_weight=kd_weight_at(cfg, step, total_steps) to kd_lm_loss"
            )
        return cfg.kd_weight
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight={kd_weight}: must be in [0, 1]")
    if cfg.missing_mass == "renorm" and kd_weight >= 1.0 and not cfg.allow_renorm_without_lm:
        raise KDScaleError(
            f"kd_weight={kd_weight} with loss.missing_mass='renorm': {RENORM_COLLAPSE_NOTE}; keep "
            "kd_weight < 1 or set loss.allow_renorm_without_lm=true"
        )
    return float(kd_weight)


def check_cache_temperature(cfg: KDLossConfig, cache_temperature: float) -> None:
    """Refuse a cache whose teacher temperature differs from ``loss.temperature`` (unless allowed).

    The cached log-probs are the teacher's softmax at the cache's temperature (its manifest's
    ``codec.temperature``); matching them with a student at another T is a different objective.
    """
    if math.isclose(cfg.temperature, cache_temperature, rel_tol=1e-6):
        return
    if cfg.allow_temperature_mismatch:
        return
    raise KDScaleError(
        f"loss.temperature={cfg.temperature} but the cache's teacher targets were written at "
        f"temperature {cache_temperature} (cache manifest codec.temperature); set "
        f"loss.temperature={cache_temperature}, rebuild the cache at {cfg.temperature}, or set "
        "loss.allow_temperature_mismatch=true"
    )
