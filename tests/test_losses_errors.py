"""Bad inputs and bad settings fail loudly with a message naming the problem, never a silent NaN;
plus the KD-weight schedules, the cache-temperature check and the config guards."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdscale.cache.targets import SparseTargets
from kdscale.config import load_config
from kdscale.errors import KDScaleError
from kdscale.losses import KDLossConfig, check_cache_temperature, kd_lm_loss, kd_weight_at
from tests.test_losses_reference import sampled_targets, teacher_distribution, topk_targets

S, B, V, K = 4, 2, 16, 3


def _inputs():
    gen = torch.Generator().manual_seed(31)
    P = teacher_distribution(B, S, V, gen)
    targets = topk_targets(P, K, dtype=torch.float32)
    logits = torch.randn(S, B, V, generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    return logits, targets, labels


def _with(targets: SparseTargets, **fields) -> SparseTargets:
    parts = dict(
        ids=targets.ids.clone(), logp=targets.logp.clone(), tail_logp=targets.tail_logp.clone()
    )
    parts.update(fields)
    return SparseTargets(parts["ids"], parts["logp"], parts["tail_logp"], targets.kind)


def _raises(match: str, logits, targets, labels, cfg=None, **kw) -> None:
    with pytest.raises(KDScaleError, match=match):
        kd_lm_loss(logits, targets, labels, cfg or KDLossConfig(), **kw)


def test_ids_out_of_range_and_duplicates() -> None:
    logits, targets, labels = _inputs()
    ids = targets.ids.clone()
    ids[0, 1, 2] = V
    _raises(r"1 teacher ids outside \[0, 16\)", logits, _with(targets, ids=ids), labels)
    ids = targets.ids.clone()
    ids[1, 0, 2] = -7
    _raises(r"teacher ids outside", logits, _with(targets, ids=ids), labels)
    ids = targets.ids.clone()
    ids[1, 3, 1] = ids[1, 3, 0]
    _raises(r"1 duplicate teacher ids", logits, _with(targets, ids=ids), labels)


def test_bad_labels() -> None:
    logits, targets, labels = _inputs()
    labels[1, 1] = V + 3
    _raises(r"1 labels outside \[0, 16\)", logits, targets, labels)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_logits(value: float) -> None:
    logits, targets, labels = _inputs()
    if value == -math.inf:  # -inf is a legal logit unless it sits on a label or teacher id
        logits[2, 1, labels[1, 2]] = value
        _raises(r"non-finite LM term", logits, targets, labels)
        logits[2, 1, labels[1, 2]] = 0.0
        logits[1, 0, targets.ids[0, 1, 0]] = value
        _raises(r"non-finite KD term", logits, targets, labels)
    else:
        logits[3, 0, 5] = value
        _raises(r"1 positions with a non-finite LM term", logits, targets, labels)


def test_padded_vocab_with_minus_inf_logits_is_fine() -> None:
    logits, targets, labels = _inputs()
    logits[..., -2:] = -math.inf  # vocab padding that no id or label uses
    targets = _with(targets, ids=torch.arange(K).expand(B, S, K).clone())
    out = kd_lm_loss(logits, targets, labels.clamp_max(V - 3), KDLossConfig())
    assert out.loss.isfinite().all()


@pytest.mark.parametrize("field", ["logp", "tail_logp"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_targets(field: str, value: float) -> None:
    logits, targets, labels = _inputs()
    bad = getattr(targets, field).clone()
    bad.view(-1)[3] = value
    _raises(r"1 NaN/\+Inf teacher log-probs", logits, _with(targets, **{field: bad}), labels)


def test_masked_positions_may_hold_garbage() -> None:
    logits, targets, labels = _inputs()
    logp = targets.logp.clone()
    logp[0, 2] = math.nan
    ids = targets.ids.clone()
    ids[0, 2, 0] = 10 * V
    labels[0, 2] = -100
    logits_leaf = logits.requires_grad_()
    out = kd_lm_loss(
        logits_leaf, _with(targets, ids=ids, logp=logp), labels, KDLossConfig(kd_weight=0.5)
    )
    out.loss.sum().backward()
    assert out.loss[0, 2] == 0 and out.loss.isfinite().all() and logits_leaf.grad.isfinite().all()


def test_all_masked_batch() -> None:
    logits, targets, labels = _inputs()
    _raises(r"every position is masked", logits, targets, torch.full_like(labels, -100))
    _raises(r"every position is masked", logits, targets, labels, loss_mask=torch.zeros(B, S))
    _raises(r"loss_mask entries", logits, targets, labels, loss_mask=torch.full((B, S), -1.0))


def test_shape_and_dtype_mismatches() -> None:
    logits, targets, labels = _inputs()
    _raises(r"targets are \[B, S, K\]", logits[:3], targets, labels)
    _raises(r"labels \(2, 3\) must be \[B, S\]", logits, targets, labels[:, :3])
    _raises(r"loss_mask \(4, 2\) must be", logits, targets, labels, loss_mask=torch.ones(S, B))
    _raises(r"must be int64", logits, targets, labels.int())
    _raises(r"float \[S, B, V/TP\]", logits.long(), targets, labels)
    _raises(r"float \[S, B, V/TP\]", logits[0], targets, labels)


def test_validation_can_be_switched_off() -> None:
    logits, targets, labels = _inputs()
    logits[0, 0, 0] = math.nan
    out = kd_lm_loss(logits, targets, labels, KDLossConfig(), validate=False)
    assert out.loss[0, 0].isnan()


@pytest.mark.parametrize(
    "kw", [dict(divergence="rkl"), dict(divergence="jsd"), dict(divergence="tvd"),
           dict(missing_mass="renorm", kd_weight=0.5)],
)  # fmt: skip
def test_sampled_targets_accept_only_forward_kl(kw: dict) -> None:
    logits, _, labels = _inputs()
    gen = torch.Generator().manual_seed(3)
    targets = sampled_targets(teacher_distribution(B, S, V, gen), 8, 8, gen)
    _raises(r"only forward KL .* unbiased", logits, targets, labels, KDLossConfig(**kw))
    out = kd_lm_loss(logits, targets, labels, KDLossConfig())
    assert out.loss.isfinite().all()


def test_renorm_without_lm_is_refused_unless_overridden() -> None:
    with pytest.raises(ValidationError, match="collapses"):
        KDLossConfig(missing_mass="renorm")
    with pytest.raises(ValidationError, match="collapses"):  # a schedule that reaches α = 1
        KDLossConfig(missing_mass="renorm", kd_weight=0.5, schedule=dict(kind="linear", start=1.0))
    with pytest.raises(KDScaleError, match="loss.missing_mass='renorm': .*collapses"):
        load_config(overrides=["loss.missing_mass=renorm"])
    KDLossConfig(missing_mass="renorm", kd_weight=0.9)
    cfg = KDLossConfig(missing_mass="renorm", allow_renorm_without_lm=True)
    logits, targets, labels = _inputs()
    assert kd_lm_loss(logits, targets, labels, cfg).loss.isfinite().all()
    with pytest.raises(KDScaleError, match="collapses"):  # α passed per call
        kd_lm_loss(
            logits,
            targets,
            labels,
            KDLossConfig(missing_mass="renorm", kd_weight=0.5),
            kd_weight=1.0,
        )


def test_temperature_mismatch() -> None:
    check_cache_temperature(KDLossConfig(temperature=2.0), 2.0)
    with pytest.raises(KDScaleError, match=r"loss.temperature=2.0 .* temperature 1.0"):
        check_cache_temperature(KDLossConfig(temperature=2.0), 1.0)
    check_cache_temperature(KDLossConfig(temperature=2.0, allow_temperature_mismatch=True), 1.0)


def test_kd_weight_schedules() -> None:
    const = KDLossConfig(kd_weight=0.7)
    assert [kd_weight_at(const, s, 10) for s in (0, 5, 9)] == [0.7, 0.7, 0.7]
    linear = KDLossConfig(kd_weight=0.5, schedule=dict(kind="linear", start=1.0))
    assert [kd_weight_at(linear, s, 11) for s in (0, 5, 10, 50)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.5]
    )
    wsd = KDLossConfig(
        kd_weight=1.0,
        schedule=dict(kind="wsd", start=0.0, end=0.4, warmup_fraction=0.2, decay_fraction=0.5),
    )
    got = [kd_weight_at(wsd, s, 11) for s in range(11)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.88, 0.76, 0.64, 0.52, 0.4])
    with pytest.raises(ValidationError, match="warmup_fraction \\+ decay_fraction = 1.1 exceeds 1"):
        KDLossConfig(schedule=dict(kind="wsd", warmup_fraction=0.6, decay_fraction=0.5))
    with pytest.raises(ValueError, match="total_steps >= 1"):
        kd_weight_at(const, 0, 0)


def test_kd_weight_must_be_passed_under_a_schedule() -> None:
    logits, targets, labels = _inputs()
    cfg = KDLossConfig(kd_weight=0.5, schedule=dict(kind="linear", start=1.0))
    with pytest.raises(ValueError, match="kd_weight=kd_weight_at"):
        kd_lm_loss(logits, targets, labels, cfg)
    out = kd_lm_loss(logits, targets, labels, cfg, kd_weight=kd_weight_at(cfg, 3, 10))
    assert out.metrics["kd_weight"].item() == pytest.approx(1.0 - 0.5 * 3 / 9)
    with pytest.raises(ValueError, match=r"kd_weight=1.5: must be in \[0, 1\]"):
        kd_lm_loss(logits, targets, labels, cfg, kd_weight=1.5)


def test_config_section_loads_from_overrides() -> None:
    cfg = load_config(
        overrides=["loss.divergence=jsd", "loss.jsd_beta=0.2", "loss.schedule.kind=wsd"]
    )
    assert (
        cfg.loss.divergence == "jsd"
        and cfg.loss.jsd_beta == 0.2
        and cfg.loss.schedule.kind == "wsd"
    )
    with pytest.raises(KDScaleError, match="loss.divergence='kl'"):
        load_config(overrides=["loss.divergence=kl"])
