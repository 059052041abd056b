"""kd_lm_loss equals the dense float64 reference: every divergence × missing-mass mode, values and
gradients, float64 and float32, plus the memory contract (what the graph saves) and bf16 / in-place.

Tolerances: float64 inputs must agree to 1e-6 relative (observed ~1e-14); float32 inputs to 1e-4
relative on per-token losses. float32 gradients are compared with an absolute floor of 1e-5 of
the largest entry: an entry like ``q_v - p_v`` near zero carries float32 rounding of order
eps·max, so a pure relative bound there would test cancellation, not the loss.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdscale.losses import KDLossConfig, kd_lm_loss, sparse_log_softmax
from kdscale.losses.vocab_parallel import Storage, choose_storage
from tests.test_losses_reference import (
    ragged_targets,
    reference_loss,
    teacher_distribution,
    topk_targets,
)

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
MODES = ("tail", "renorm", "zero")
S, B, V, K = 5, 3, 37, 6


def _case(seed: int, dtype: torch.dtype = torch.float64, ragged: bool = False):
    gen = torch.Generator().manual_seed(seed)
    P = teacher_distribution(B, S, V, gen)
    logits = (2.0 * torch.randn(S, B, V, generator=gen, dtype=torch.float64)).to(dtype)
    targets = ragged_targets(P, K, gen) if ragged else topk_targets(P, K)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, 1] = -100
    mask = torch.rand(B, S, generator=gen, dtype=torch.float64).round()  # some 0s
    mask[:, 0] = 1.0
    return P, logits, targets, labels, mask


def _ours(logits, targets, labels, cfg, mask):
    leaf = logits.detach().requires_grad_()
    out = kd_lm_loss(leaf, targets, labels, cfg, loss_mask=mask)
    (grad,) = torch.autograd.grad(out.loss.sum(), leaf)
    return out, grad


def _reference(logits, P, targets, labels, cfg, mask):
    leaf = logits.detach().to(torch.float64).requires_grad_()
    ref = reference_loss(
        leaf, P, targets.ids, labels, divergence=cfg.divergence, missing_mass=cfg.missing_mass,
        temperature=cfg.temperature, kd_weight=cfg.kd_weight, jsd_beta=cfg.jsd_beta, loss_mask=mask,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(ref.sum(), leaf)
    return ref.detach(), grad


def _cfg(divergence: str, mode: str, **kw) -> KDLossConfig:
    return KDLossConfig(divergence=divergence, missing_mass=mode, kd_weight=0.7, **kw)


@pytest.mark.parametrize("divergence,mode", list(itertools.product(DIVERGENCES, MODES)))
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_dense_reference_float64(divergence: str, mode: str, temperature: float) -> None:
    P, logits, targets, labels, mask = _case(10, ragged=True)
    cfg = _cfg(divergence, mode, temperature=temperature, jsd_beta=0.3)
    out, grad = _ours(logits, targets, labels, cfg, mask)
    ref, ref_grad = _reference(logits, P, targets, labels, cfg, mask)
    assert out.loss.dtype == torch.float64 and out.loss.shape == (B, S)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    assert out.loss[0, 1] == 0 and (out.loss[mask == 0] == 0).all()
    assert (grad[1, 0] == 0).all()  # label -100 at (b=0, s=1) → no gradient anywhere in that row


@pytest.mark.parametrize("divergence,mode", list(itertools.product(DIVERGENCES, MODES)))
def test_matches_dense_reference_float32(divergence: str, mode: str) -> None:
    P, logits, targets, labels, mask = _case(11, dtype=torch.float32)
    targets = topk_targets(P, K, dtype=torch.float32)  # float32 teacher log-probs, as cached
    cfg = _cfg(divergence, mode, temperature=2.0)
    out, grad = _ours(logits, targets, labels, cfg, mask)
    ref, ref_grad = _reference(logits, P, targets, labels, cfg, mask)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item()
    )


@pytest.mark.parametrize("divergence,mode", list(itertools.product(DIVERGENCES, MODES)))
def test_gradcheck(divergence: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(12)
    P = teacher_distribution(2, 3, 11, gen)
    targets = ragged_targets(P, 4, gen)
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    logits = torch.randn(3, 2, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    cfg = _cfg(divergence, mode, temperature=1.5)
    assert torch.autograd.gradcheck(lambda z: kd_lm_loss(z, targets, labels, cfg).loss, (logits,))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_full_vocab_tail_is_full_forward_kl(temperature: float) -> None:
    gen = torch.Generator().manual_seed(13)
    P = teacher_distribution(B, S, V, gen)
    targets = topk_targets(P, V)  # K = V: the support is the whole vocabulary, tail = -inf
    labels = torch.zeros(B, S, dtype=torch.long)
    logits = torch.randn(S, B, V, generator=gen, dtype=torch.float64)
    cfg = KDLossConfig(temperature=temperature)
    out, grad = _ours(logits, targets, labels, cfg, None)
    leaf = logits.clone().requires_grad_()
    logq = torch.log_softmax(leaf.transpose(0, 1) / temperature, -1)
    full_kl = temperature**2 * (P * (P.log() - logq)).sum(-1)
    (ref_grad,) = torch.autograd.grad(full_kl.sum(), leaf)
    torch.testing.assert_close(out.loss, full_kl.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out.metrics["covered_mass"], torch.tensor(1.0, dtype=torch.float64))


def test_tail_is_computed_directly_not_as_one_minus_covered() -> None:
    # Student mass outside the support is ~1e-12 of the total: 1 - Σq would round to 0 in float32.
    vocab, k = 8, 4
    logits = torch.zeros(1, 1, vocab)
    logits[..., k:] = -28.0
    ids = torch.arange(k).view(1, k)
    out = sparse_log_softmax(logits, ids, torch.zeros(1, dtype=torch.long))
    outside = (vocab - k) * math.exp(-28.0)
    assert out.logq_tail_N.item() == pytest.approx(math.log(outside / (k + outside)), rel=1e-6)
    torch.testing.assert_close(out.logq_NK, torch.full((1, k), -math.log(k + outside)))


def test_metrics_are_weighted_token_means() -> None:
    P, logits, targets, labels, mask = _case(14)
    cfg = KDLossConfig(kd_weight=0.25)
    out = kd_lm_loss(logits, targets, labels, cfg, loss_mask=mask)
    weight = mask * (labels != -100)
    kd_only = reference_loss(logits, P, targets.ids, labels, divergence="fkl", missing_mass="tail")
    lm_only = reference_loss(
        logits, P, targets.ids, labels, divergence="fkl", missing_mass="tail", kd_weight=0.0
    )
    m = out.metrics
    torch.testing.assert_close(m["kd"], (weight * kd_only).sum() / weight.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(m["lm"], (weight * lm_only).sum() / weight.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(m["kl_teacher_tail"], m["kd"])  # fkl on the tail buckets: the same
    torch.testing.assert_close(m["loss"], 0.25 * m["kd"] + 0.75 * m["lm"], rtol=1e-12, atol=0)
    covered = P.gather(-1, targets.ids).sum(-1)
    torch.testing.assert_close(m["covered_mass"], (weight * covered).sum() / weight.sum())
    assert m["tokens"].item() == (weight > 0).sum().item() and m["kd_weight"].item() == 0.25


@pytest.mark.parametrize(("divergence", "missing_mass"), itertools.product(DIVERGENCES, MODES))
def test_kl_teacher_tail_has_one_definition_whatever_the_objective(
    divergence: str, missing_mass: str
) -> None:
    # Forward KL from the cached teacher (top-K ids + its tail bucket) to the student's full
    # softmax, the same number whichever divergence and buckets the objective itself uses.
    P, logits, targets, labels, mask = _case(16)
    weight = mask * (labels != -100)
    kl = reference_loss(logits, P, targets.ids, labels, divergence="fkl", missing_mass="tail")
    cfg = KDLossConfig(divergence=divergence, missing_mass=missing_mass, kd_weight=0.5)
    m = kd_lm_loss(logits, targets, labels, cfg, loss_mask=mask).metrics
    torch.testing.assert_close(m["kl_teacher_tail"], (weight * kl).sum() / weight.sum(),
                               rtol=1e-12, atol=0)  # fmt: skip
    if (divergence, missing_mass) != ("fkl", "tail"):
        assert not torch.isclose(m["kd"], m["kl_teacher_tail"])  # the objective is another figure


def test_graph_saves_no_second_vocab_sized_tensor() -> None:
    P, logits, targets, labels, _ = _case(15)
    hidden = torch.randn(S, B, 16, dtype=torch.float64)
    weight = torch.randn(16, V, dtype=torch.float64, requires_grad=True)
    big: list[tuple[int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= S * B * V:
            big.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits_SBV = hidden @ weight
        out = kd_lm_loss(logits_SBV, targets, labels, _cfg("jsd", "tail", temperature=2.0))
    logits_ptr = logits_SBV.untyped_storage().data_ptr()
    assert big and all(ptr == logits_ptr for ptr, _ in big), big
    out.loss.sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize(
    "dtype,temperature,mode",
    [
        (torch.float32, 1.0, Storage.STORE_EXP),
        (torch.float64, 1.0, Storage.STORE_EXP),
        (torch.float32, 1.3, Storage.GRAD_INPLACE),
        (torch.bfloat16, 1.0, Storage.GRAD_INPLACE),
    ],
)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_storage_reuse_matches_separate_and_is_guarded(dtype, temperature, mode, alpha) -> None:
    P, logits, targets, labels, mask = _case(16)
    hidden = torch.randn(S, B, 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = {}
    for overwrite in (False, True):
        weight = torch.randn(16, V, generator=torch.Generator().manual_seed(0), dtype=dtype)
        weight.requires_grad_()
        logits_SBV = hidden @ weight  # a non-leaf, non-view tensor, as an output layer makes
        expected = mode if overwrite else Storage.SEPARATE
        assert choose_storage(logits_SBV, temperature, overwrite) is expected
        cfg = KDLossConfig(kd_weight=alpha, temperature=temperature, overwrite_logits=overwrite)
        out = kd_lm_loss(logits_SBV, targets, labels, cfg, loss_mask=mask)
        out.loss.sum().backward(retain_graph=True)
        results[overwrite] = (out.loss.detach(), weight.grad.clone())
        if overwrite:  # the saved logits were reused: a second backward must refuse, not lie
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.loss.sum().backward()
    assert torch.equal(results[False][0], results[True][0])
    assert torch.equal(results[False][1], results[True][1])


def test_bf16_logits_compute_in_float32() -> None:
    P, logits, targets, labels, mask = _case(17, dtype=torch.bfloat16)
    cfg = KDLossConfig(kd_weight=0.5, temperature=2.0, chunk_elements=V * 4)
    out16, grad16 = _ours(logits, targets, labels, cfg, mask)
    out32, grad32 = _ours(logits.float(), targets, labels, cfg, mask)
    assert out16.loss.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    assert torch.equal(out16.loss, out32.loss)
    assert torch.equal(grad16, grad32.to(torch.bfloat16))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_pure_lm_and_pure_kd_weights(alpha: float) -> None:
    P, logits, targets, labels, mask = _case(18)
    cfg = KDLossConfig(kd_weight=alpha, temperature=1.5)
    out, grad = _ours(logits, targets, labels, cfg, mask)
    ref, ref_grad = _reference(logits, P, targets, labels, cfg, mask)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_chunking_does_not_change_results() -> None:
    # Only rounding may differ: torch's CPU exp2 takes the last < 32 elements of a contiguous
    # buffer through the scalar libm exp2 instead of the vector one (both within 1 ulp), and
    # which elements those are depends on the chunk's size.
    P, logits, targets, labels, mask = _case(19, dtype=torch.float32)
    cfg = KDLossConfig(kd_weight=0.5, temperature=1.3)
    out_a, grad_a = _ours(logits, targets, labels, cfg, mask)
    out_b, grad_b = _ours(
        logits, targets, labels, cfg.model_copy(update={"chunk_elements": 1}), mask
    )
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-6, atol=1e-7 * grad_a.abs().max().item())


def test_non_contiguous_logits() -> None:
    P, logits, targets, labels, mask = _case(20)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [S, B, V] with B-major strides
    assert not strided.is_contiguous()
    cfg = KDLossConfig(kd_weight=0.5)
    out_a, grad_a = _ours(logits, targets, labels, cfg, mask)
    out_b, grad_b = _ours(strided, targets, labels, cfg, mask)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-14, atol=0)
