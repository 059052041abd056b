"""TP=2 over gloo (two spawned ranks, each with half the vocabulary) equals TP=1.

float64 cases must agree to 1e-12 (only the order of two partial sums differs); the float32
case to 1e-6 relative, the rounding of a sum split in two.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from kdscale.losses import KDLossConfig, kd_lm_loss
from tests.dist import run_distributed
from tests.test_losses_reference import ragged_targets, teacher_distribution

S, B, V, K, TP = 4, 3, 38, 5, 2
PAIRS = itertools.product(("fkl", "rkl", "jsd", "tvd"), ("tail", "renorm", "zero"))
CASES = [
    (dtype, dict(divergence=d, missing_mass=m, kd_weight=0.6, temperature=1.5, jsd_beta=0.4))
    for dtype, (d, m) in [*((torch.float64, pair) for pair in PAIRS), (torch.float32, ("fkl", "tail"))]
] + [  # T = 1: the logits' storage holds exp(z - max) between forward and backward
    (torch.float64, dict(divergence="jsd", missing_mass="tail", kd_weight=0.6)),
    (torch.float32, dict(divergence="fkl", missing_mass="tail", kd_weight=0.6)),
]


def _inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(21)
    P = teacher_distribution(B, S, V, gen)
    targets = ragged_targets(P, K, gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[1, 2] = -100
    mask = torch.ones(B, S, dtype=torch.float64)
    mask[2, 0] = 0.0
    logits = (3.0 * torch.randn(S, B, V, generator=gen, dtype=torch.float64)).to(dtype)
    return logits, targets, labels, mask


def _run(logits_SBV: torch.Tensor, kw: dict, group: dist.ProcessGroup | None):
    _, targets, labels, mask = _inputs(logits_SBV.dtype)
    leaf = logits_SBV.detach().clone().requires_grad_()
    logits = leaf.clone()  # a non-leaf, like an output layer's: its storage may be reused
    out = kd_lm_loss(logits, targets, labels, KDLossConfig(**kw), group, loss_mask=mask)
    (grad,) = torch.autograd.grad(out.loss.sum(), leaf)
    return out.loss.detach(), {k: v.detach() for k, v in out.metrics.items()}, grad


def _worker(rank: int, world_size: int) -> list:
    results = []
    for dtype, kw in CASES:
        logits = _inputs(dtype)[0]
        shard = logits.chunk(world_size, dim=-1)[rank]
        results.append(_run(shard, kw, dist.group.WORLD))
    return results


def test_tp2_equals_tp1() -> None:
    ranks = run_distributed(_worker, world_size=TP)
    for i, (dtype, kw) in enumerate(CASES):
        loss, metrics, grad = _run(_inputs(dtype)[0], kw, None)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
        for rank_loss, rank_metrics, _ in (r[i] for r in ranks):
            torch.testing.assert_close(rank_loss, loss, **tol, msg=str(kw))
            for name, value in metrics.items():
                torch.testing.assert_close(rank_metrics[name], value, **tol, msg=f"{kw} {name}")
        grad_tp = torch.cat([r[i][2] for r in ranks], dim=-1)
        torch.testing.assert_close(grad_tp, grad, **tol, msg=str(kw))
