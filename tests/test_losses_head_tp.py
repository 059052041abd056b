"""head_kd_lm_loss at TP=2 and TP=1 with megatron's own layers: two spawned gloo ranks build a
VocabParallelEmbedding (its weight tied to the output, or not) and a ColumnParallelLinear output
layer, first at TP=2, then at TP=1 (both ranks whole); the fused loss must equal the unfused path
(the output layer, then kd_lm_loss) at each TP, and TP=2 must equal TP=1. With sequence
parallelism (TP=2, float32, untied), the fused loss must equal megatron's sequence-parallel
output layer + kd_lm_loss, and the same loss without sequence parallelism.

Compared: per-token losses, metrics, the gradient of the hidden states (all-reduced over TP by
megatron's copy_to_tensor_model_parallel_region in both paths) and of each weight shard. float32
to 1e-6 relative (gradients with a floor of 1e-6 of the largest entry, see test_losses_head.py),
bf16 losses to 1e-6 and gradients to bf16 precision (2⁻⁶, same floor).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kdscale.losses import KDLossConfig, head_kd_lm_loss, kd_lm_loss
from tests.dist import run_distributed
from tests.test_losses_reference import ragged_targets, teacher_distribution

S, B, V, H, K = 4, 3, 256, 16, 5
CASES = {
    "fkl-tail-T1": dict(kd_weight=0.5),
    "jsd-renorm-T2": dict(divergence="jsd", missing_mass="renorm", kd_weight=0.6, temperature=2.0),
    "lm-only": None,  # no targets; unfused: megatron's vocab_parallel_cross_entropy
}
FP32 = dict(rtol=1e-6, floor=1e-6)
BF16 = dict(rtol=2.0**-6, floor=2.0**-6)


def _inputs():
    gen = torch.Generator().manual_seed(22)
    P = teacher_distribution(B, S, V, gen)
    targets = ragged_targets(P, K, gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[1, 2] = -100
    tokens = torch.randint(0, V, (B, S), generator=gen)
    embedding = 0.5 * torch.randn(V, H, generator=gen)
    output = 0.5 * torch.randn(V, H, generator=gen)
    mix = torch.randn(H, H, generator=gen) / H**0.5
    return targets, labels, tokens, embedding, output, mix


def _run(
    tp: int, dtype: torch.dtype, tied: bool, kw: dict | None, fused: bool, sp: bool = False
) -> dict:
    """One forward + backward on this rank's shard of a tiny embedding → mix → output model.

    ``sp`` (untied only): the output layer takes this rank's sequence slice of the hidden states
    (as a leaf), as under megatron's sequence parallelism; its gradient is reported as ``hidden``.
    """
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        VocabParallelEmbedding,
        vocab_parallel_cross_entropy,
    )

    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group)
    targets, labels, tokens, embedding, output, mix = _inputs()
    config = ModelParallelConfig(
        tensor_model_parallel_size=tp, params_dtype=dtype, use_cpu_initialization=True,
        perform_initialization=False, sequence_parallel=sp,
    )  # fmt: skip
    embed = VocabParallelEmbedding(V, H, init_method=lambda w: w, config=config, tp_group=group)
    head = ColumnParallelLinear(
        H, V, config=config, init_method=lambda w: w, bias=False, skip_weight_param_allocation=tied,
        tp_group=group,
    )  # fmt: skip
    with torch.no_grad():
        embed.weight.copy_(embedding.chunk(tp)[rank])
        if not tied:
            head.weight.copy_(output.chunk(tp)[rank])
    weight = embed.weight if tied else head.weight
    mix = mix.to(dtype).requires_grad_()
    hidden = torch.tanh(embed(tokens).transpose(0, 1) @ mix)  # [S, B, H], as after a final norm
    if sp:
        hidden = hidden.detach().chunk(tp)[rank].requires_grad_()
    hidden.retain_grad()
    cfg = KDLossConfig(**(kw or {}), chunk_elements=64 * S * B)  # 64-column vocab blocks
    teacher = None if kw is None else targets
    if fused:
        out = head_kd_lm_loss(hidden, weight, teacher, labels, cfg, group, sequence_parallel=sp)
    else:
        logits, _ = head(hidden, weight=weight if tied else None)
        if teacher is None:  # the no-cache path: megatron's cross-entropy
            labels_SB = labels.t().contiguous()
            ce_SB = vocab_parallel_cross_entropy(logits.float(), labels_SB.clamp_min(0))
            loss = (ce_SB * (labels_SB != -100)).t()
            return _backward(loss, None, hidden, embed, head, tied)
        out = kd_lm_loss(logits, teacher, labels, cfg, group)
    return _backward(out.loss, out.metrics, hidden, embed, head, tied)


def _backward(loss_BS, metrics, hidden, embed, head, tied: bool) -> dict:
    loss_BS.sum().backward()
    grads = {"hidden": hidden.grad, "embedding": embed.weight.grad}
    if not tied:
        grads["output"] = head.weight.grad
    grads = {k: v for k, v in grads.items() if v is not None}
    return {"loss": loss_BS.detach(), "metrics": metrics, "grads": grads}


def _worker(rank: int, world_size: int) -> dict:
    import kdscale.models  # noqa: F401  (megatron-core on CPU)
    from megatron.core import parallel_state

    results = {}
    for tp in (2, 1):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        for dtype in (torch.float32, torch.bfloat16):
            for tied in (False, True):
                for name, kw in CASES.items():
                    for fused in (True, False):
                        results[tp, dtype, tied, name, fused] = _run(tp, dtype, tied, kw, fused)
                        if tp == 2 and dtype == torch.float32 and not tied:
                            results["sp", name, fused] = _run(tp, dtype, tied, kw, fused, sp=True)
        parallel_state.destroy_model_parallel()
    return results


def _close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    atol = tol["floor"] * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol, msg=what)


def _assert_same(got: dict, want: dict, grad_tol: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0, msg=what)
    for name, value in (want["metrics"] or {}).items():  # megatron's CE has none
        torch.testing.assert_close(got["metrics"][name], value, rtol=1e-6, atol=0, msg=f"{what} {name}")
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        _close(got["grads"][name], grad, grad_tol, f"{what} grad {name}")


def test_fused_head_equals_unfused_at_tp2_and_tp1() -> None:
    ranks = run_distributed(_worker, world_size=2)
    for key, result in ranks[0].items():
        if key[0] == "sp":
            continue
        tp, dtype, tied, name, fused = key
        if not fused:
            continue
        what = f"TP={tp} {dtype} tied={tied} {name}"
        tol = FP32 if dtype == torch.float32 else BF16
        for rank in ranks:  # fused == unfused on every rank, at each TP
            _assert_same(rank[tp, dtype, tied, name, True], rank[tp, dtype, tied, name, False], tol, what)
        if tp == 2:  # TP=2 (weight shards joined) == TP=1
            joined = dict(result, grads={
                k: torch.cat([r[2, dtype, tied, name, True]["grads"][k] for r in ranks])
                if k != "hidden" else v for k, v in result["grads"].items()
            })  # fmt: skip
            _assert_same(joined, ranks[0][1, dtype, tied, name, True], tol, f"{what} vs TP=1")
    for name in CASES:  # sequence parallelism: == megatron's SP output layer, == no SP
        for rank, result in enumerate(ranks):
            fused = result["sp", name, True]
            _assert_same(fused, result["sp", name, False], FP32, f"SP {name}")
            whole = result[2, torch.float32, False, name, True]
            local = dict(whole, grads=dict(whole["grads"], hidden=whole["grads"]["hidden"].chunk(2)[rank]))
            del local["grads"]["embedding"]  # SP's hidden is a leaf: no embedding gradient
            _assert_same(fused, local, FP32, f"SP vs no SP {name}")
