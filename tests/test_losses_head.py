"""head_kd_lm_loss (output layer fused into the loss) equals the unfused path — the output layer
``hidden @ weightᵀ`` then kd_lm_loss — at TP=1: every divergence × missing-mass mode × T, values,
metrics and the gradients of hidden states and weight, tied and untied, float32 and bf16; plus the
LM-only mode, gradcheck, the memory contract and the per-call validation switch. TP=2 with
megatron's own layers: tests/test_losses_head_tp.py.

Tolerances. float32: 1e-6 relative; gradients with a floor of 1e-6 of the tensor's largest entry
(entries like ``q_v - p_v`` cancel; the unfused float32 path itself is 1.6e-6 of the largest entry
away from float64 on these cases). Only the order of float32 sums differs: the fused pass sums each
token's exponentials block by block with the online rescaling and accumulates the hidden-state
gradient over blocks; the logits are bit-identical (the matmul runs on whole vocab blocks).
bf16: the same forward (the same bf16 logits), hence 1e-6 on the losses; gradients to bf16
precision (2⁻⁶ relative, as torch.testing's default for bf16, with the same floor), since the
hidden-state gradient is summed from bf16 block products.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdscale.errors import KDScaleError
from kdscale.losses import KDLossConfig, head_kd_lm_loss, kd_lm_loss
from tests.test_losses_reference import ragged_targets, teacher_distribution

S, B, V, H, K = 5, 3, 203, 16, 6
BLOCKS = 64 * S * B  # chunk_elements giving 64-column vocab blocks: 203 columns in 3 blocks
FP32 = dict(rtol=1e-6, floor=1e-6)
BF16 = dict(rtol=2.0**-6, floor=2.0**-6)


def _case(seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    P = teacher_distribution(B, S, V, gen)
    targets = ragged_targets(P, K, gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, 1] = -100
    mask = torch.ones(B, S)
    mask[2, 3] = 0.0
    hidden = torch.randn(S, B, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (0.7 * torch.randn(V, H, generator=gen, dtype=torch.float64)).to(dtype)
    return targets, labels, mask, hidden, weight


def _run(fused: bool, hidden, weight, targets, labels, cfg, mask, tied: bool = False):
    """Loss, metrics and the gradients of hidden and weight; ``tied`` also feeds the weight to an
    embedding lookup that produces part of the hidden states, as with tied embeddings."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    inputs_SB = torch.arange(S * B).view(S, B) * 7 % V  # any token ids
    x = h + F.embedding(inputs_SB, w) if tied else h
    if fused:
        out = head_kd_lm_loss(x, w, targets, labels, cfg, loss_mask=mask)
    else:
        out = kd_lm_loss(x @ w.t(), targets, labels, cfg, loss_mask=mask)
    out.loss.sum().backward()
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, h.grad, w.grad


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, floor: float, what: str) -> None:
    atol = floor * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=what)


def _assert_same(fused, unfused, loss_tol: dict, grad_tol: dict, what: str) -> None:
    (loss, metrics, g_h, g_w), (loss_u, metrics_u, g_hu, g_wu) = fused, unfused
    torch.testing.assert_close(loss, loss_u, rtol=loss_tol["rtol"], atol=0, msg=what)
    assert metrics.keys() == metrics_u.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], metrics_u[name], rtol=1e-6, atol=0, msg=name)
    _close(g_h, g_hu, **grad_tol, what=f"hidden grad {what}")
    _close(g_w, g_wu, **grad_tol, what=f"weight grad {what}")


@pytest.mark.parametrize(
    "divergence,mode", list(itertools.product(("fkl", "rkl", "jsd", "tvd"), ("tail", "renorm", "zero")))
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_unfused_float32(divergence: str, mode: str, temperature: float) -> None:
    targets, labels, mask, hidden, weight = _case(1)
    cfg = KDLossConfig(
        divergence=divergence, missing_mass=mode, kd_weight=0.6, temperature=temperature,
        jsd_beta=0.3, chunk_elements=BLOCKS,
    )  # fmt: skip
    fused = _run(True, hidden, weight, targets, labels, cfg, mask)
    unfused = _run(False, hidden, weight, targets, labels, cfg, mask)
    _assert_same(fused, unfused, FP32, FP32, f"{divergence}/{mode}/T={temperature}")
    assert fused[0][0, 1] == 0 and fused[0][2, 3] == 0  # ignored label, masked position ([B, S])
    assert (fused[2][1, 0] == 0).all() and (fused[2][3, 2] == 0).all()  # their hidden states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_dtypes_tied_weights_and_alpha(dtype: torch.dtype, tied: bool, alpha: float) -> None:
    targets, labels, mask, hidden, weight = _case(2, dtype)
    cfg = KDLossConfig(kd_weight=alpha, temperature=1.5, chunk_elements=BLOCKS)
    fused = _run(True, hidden, weight, targets, labels, cfg, mask, tied)
    unfused = _run(False, hidden, weight, targets, labels, cfg, mask, tied)
    assert fused[2].dtype == fused[3].dtype == dtype and fused[0].dtype == torch.float32
    _assert_same(fused, unfused, FP32, FP32 if dtype == torch.float32 else BF16, f"{dtype} {tied}")


def test_block_size_does_not_change_results() -> None:
    targets, labels, mask, hidden, weight = _case(3)
    cfg = KDLossConfig(kd_weight=0.5, temperature=2.0)
    one_block = _run(True, hidden, weight, targets, labels, cfg, mask)
    for blocks in (1, BLOCKS):  # 64-column blocks either way (the narrowest the head uses)
        many = _run(True, hidden, weight, targets, labels, cfg.model_copy(update={"chunk_elements": blocks}), mask)
        _assert_same(many, one_block, FP32, FP32, f"chunk_elements={blocks}")


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(4)
    P = teacher_distribution(2, 3, 70, gen)
    targets = ragged_targets(P, 4, gen)
    labels = torch.randint(0, 70, (2, 3), generator=gen)
    hidden = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(70, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    for divergence, mode in (("jsd", "tail"), ("rkl", "renorm")):
        cfg = KDLossConfig(
            divergence=divergence, missing_mass=mode, kd_weight=0.6, temperature=1.5,
            chunk_elements=1,
        )  # fmt: skip

        def loss(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return head_kd_lm_loss(h, w, targets, labels, cfg).loss

        assert torch.autograd.gradcheck(loss, (hidden, weight))


def test_lm_only_is_cross_entropy() -> None:
    targets, labels, mask, hidden, weight = _case(5)
    cfg = KDLossConfig(temperature=2.0, chunk_elements=BLOCKS)  # T does not apply to the LM term
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = head_kd_lm_loss(h, w, None, labels, cfg, loss_mask=mask)
    out.loss.sum().backward()
    h_ref = hidden.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    ce = F.cross_entropy((h_ref @ w_ref.t()).flatten(0, 1), labels.t().flatten(), reduction="none")
    ref = (ce.view(S, B).t() * mask).contiguous()
    ref.sum().backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-6, atol=0)
    _close(h.grad, h_ref.grad, **FP32, what="hidden grad")
    _close(w.grad, w_ref.grad, **FP32, what="weight grad")
    assert set(out.metrics) == {"loss", "lm", "kd_weight", "tokens"}
    assert out.metrics["kd_weight"] == 0 and out.metrics["tokens"] == 13
    with pytest.raises(KDScaleError, match=r"kd_weight=0.5 without teacher targets"):
        head_kd_lm_loss(hidden, weight, None, labels, cfg, kd_weight=0.5)


def test_graph_saves_no_logits_sized_tensor() -> None:
    targets, labels, mask, hidden, weight = _case(6)
    n_logits = S * B * V
    big: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= n_logits:
            big.append(tuple(t.shape))
        return t

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    cfg = KDLossConfig(divergence="jsd", temperature=2.0, chunk_elements=BLOCKS)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = head_kd_lm_loss(h, w, targets, labels, cfg, loss_mask=mask)
    assert big == [tuple(w.shape)], big  # the weight itself ([V, H], H > N here), nothing else
    out.loss.sum().backward()
    frozen = weight.clone()  # a frozen output layer: only the hidden states get a gradient
    h2 = hidden.clone().requires_grad_()
    head_kd_lm_loss(h2, frozen, targets, labels, cfg, loss_mask=mask).loss.sum().backward()
    _close(h2.grad, h.grad, rtol=0, floor=0, what="hidden grad, frozen weight")
    assert frozen.grad is None


def test_validation_is_a_per_call_choice() -> None:
    targets, labels, mask, hidden, weight = _case(7)
    hidden[2, 1, 0] = math.nan
    cfg = KDLossConfig(kd_weight=0.5)
    with pytest.raises(KDScaleError, match=r"head_kd_lm_loss: 1 positions with a non-finite LM"):
        head_kd_lm_loss(hidden, weight, targets, labels, cfg)
    out = head_kd_lm_loss(hidden, weight, targets, labels, cfg, validate=False)
    assert out.loss[1, 2].isnan() and out.loss[0, 0].isfinite()
    with pytest.raises(KDScaleError, match=r"every position is masked"):
        head_kd_lm_loss(hidden, weight, None, labels, cfg, loss_mask=torch.zeros(B, S))


def test_bad_shapes_and_dtypes() -> None:
    targets, labels, _, hidden, weight = _case(8)
    cfg = KDLossConfig()
    with pytest.raises(KDScaleError, match=r"weight must be this rank's output weight \[V/TP, H=16\]"):
        head_kd_lm_loss(hidden, weight[:, :8], targets, labels, cfg)
    with pytest.raises(KDScaleError, match=r"in the hidden states' dtype torch.float32"):
        head_kd_lm_loss(hidden, weight.bfloat16(), targets, labels, cfg)
    with pytest.raises(KDScaleError, match=r"hidden must be a float \[S, B, H\]"):
        head_kd_lm_loss(hidden[0], weight, targets, labels, cfg)
    with pytest.raises(KDScaleError, match=r"head_kd_lm_loss: targets are \[B, S, K\]"):
        head_kd_lm_loss(hidden[:3], weight, targets, labels, cfg)
