"""Activation-based importance (Minitron) from forward hooks on a megatron GPTModel.

Per layer, over calibration tokens:

- attention heads: L2 over each head's channels of the ``linear_proj`` input (the attention
  context), then reduced over the sequence and the samples;
- MLP neurons: |input of ``linear_fc2``| (the SwiGLU product), reduced the same way;
- hidden channels: |output of ``input_layernorm`` and ``pre_mlp_layernorm``| (normalised
  hidden states), reduced the same way;
- depth: block importance 1 − cos(layer input, layer output), averaged over tokens.

Reduction: ``seq_aggregation`` (mean | l2 | max of |act| over a sample's positions), then
``batch_aggregation`` (l2 | mean | max over samples). Heads and neurons are split over tensor
ranks: their scores are all-gathered over the TP group before anything is ranked, and every
score is reduced over the data-parallel group, so all ranks hold identical, complete scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kdscale.progress import track


class _Accumulator:
    """Per-unit scores of samples ``[B, U]``, reduced over samples as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.value: torch.Tensor | None = None
        self.count = 0

    def add(self, scores_BU: torch.Tensor) -> None:
        scores_BU = scores_BU.double()
        if self.kind == "max":
            part = scores_BU.amax(0)
            self.value = part if self.value is None else torch.maximum(self.value, part)
        else:
            part = scores_BU.square().sum(0) if self.kind == "l2" else scores_BU.sum(0)
            self.value = part if self.value is None else self.value + part
        self.count += scores_BU.shape[0]

    def reduce(self, group: dist.ProcessGroup) -> None:
        """Combine the partial sums (or maxima) of every rank of ``group``."""
        assert self.value is not None, "no calibration batch reached this hook"
        dist.all_reduce(
            self.value,
            op=dist.ReduceOp.MAX if self.kind == "max" else dist.ReduceOp.SUM,
            group=group,
        )
        count = torch.tensor([self.count], dtype=torch.float64)
        dist.all_reduce(count, group=group)
        self.count = int(count.item())

    def result(self) -> torch.Tensor:
        assert self.value is not None
        if self.kind == "l2":
            return self.value.sqrt()
        return self.value / self.count if self.kind == "mean" else self.value


def _over_sequence(act_SBU: torch.Tensor, kind: str) -> torch.Tensor:
    """``[S, B, U]`` → ``[B, U]``: |activation| reduced over positions."""
    act_SBU = act_SBU.detach().float().abs()
    if kind == "mean":
        return act_SBU.mean(0)
    if kind == "l2":
        return act_SBU.norm(dim=0)
    return act_SBU.amax(0)


@dataclass
class Importance:
    """Complete scores of one model (identical on every rank)."""

    heads: torch.Tensor  # [L, num_attention_heads]
    neurons: torch.Tensor  # [L, ffn_hidden_size]
    hidden: torch.Tensor  # [L, 2, hidden_size]: input_layernorm, pre_mlp_layernorm outputs
    layers: torch.Tensor  # [L] block importance
    loss: float  # mean LM loss of the calibration tokens
    tokens: int  # calibration tokens scored (all data-parallel ranks)

    def groups(self, num_query_groups: int) -> torch.Tensor:
        """``[L, G]``: each query group's score, the L2 norm of its heads' scores."""
        L, H = self.heads.shape
        return self.heads.reshape(L, num_query_groups, H // num_query_groups).norm(dim=-1)

    def hidden_channels(self) -> torch.Tensor:
        """``[hidden]``: one score per residual channel, summed over every norm of every layer."""
        return self.hidden.sum(dim=(0, 1))


def collect_importance(
    gpt: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    kv_channels: int,
    seq_aggregation: str,
    batch_aggregation: str,
) -> Importance:
    """Run ``gpt`` (one pipeline stage holding all layers) over ``batches`` of token ids
    ``[B, S + 1]`` and score its units (collective over the TP and DP groups)."""
    layers = list(gpt.decoder.layers)
    acc = {
        name: [_Accumulator(batch_aggregation) for _ in layers]
        for name in ("heads", "neurons", "norm1", "norm2")
    }
    block = torch.zeros(len(layers), dtype=torch.float64)
    handles = []

    def pre_hook(name: str, i: int, per_head: bool):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            act = args[0]
            if per_head:  # [S, B, heads·kv] → [S, B, heads]: each head's L2 norm
                act = act.float().unflatten(-1, (-1, kv_channels)).norm(dim=-1)
            acc[name][i].add(_over_sequence(act, seq_aggregation))

        return hook

    def norm_hook(name: str, i: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            acc[name][i].add(_over_sequence(output, seq_aggregation))

        return hook

    def block_hook(i: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            x_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            block[i] += (1 - cos).double().sum()

        return hook

    for i, layer in enumerate(layers):
        handles += [
            layer.self_attention.linear_proj.register_forward_pre_hook(pre_hook("heads", i, True)),
            layer.mlp.linear_fc2.register_forward_pre_hook(pre_hook("neurons", i, False)),
            layer.input_layernorm.register_forward_hook(norm_hook("norm1", i)),
            layer.pre_mlp_layernorm.register_forward_hook(norm_hook("norm2", i)),
            layer.register_forward_hook(block_hook(i), with_kwargs=True),
        ]
    try:
        loss_sum, tokens = _run(gpt, batches, "scoring")
    finally:
        for handle in handles:
            handle.remove()

    dp = parallel_state.get_data_parallel_group()
    for accumulators in acc.values():
        for a in accumulators:
            a.reduce(dp)
    totals = torch.cat([block, torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)])
    dist.all_reduce(totals, group=dp)
    block, loss_sum, tokens = totals[:-2], totals[-2].item(), int(totals[-1].item())

    def stack(name: str, tp_split: bool) -> torch.Tensor:
        scores = torch.stack([a.result() for a in acc[name]])
        return _gather_tensor_parallel(scores) if tp_split else scores

    return Importance(
        heads=stack("heads", True).float(),
        neurons=stack("neurons", True).float(),
        hidden=torch.stack([stack("norm1", False), stack("norm2", False)], dim=1).float(),
        layers=(block / tokens).float(),
        loss=loss_sum / tokens,
        tokens=tokens,
    )


def _run(
    gpt: torch.nn.Module, batches: Iterable[torch.Tensor], desc: str
) -> tuple[float, int]:
    """Forward every batch with labels; return (sum of per-token LM loss, tokens)."""
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in track(batches, desc, unit="batch", tokens_of=lambda b: b[:, 1:].numel()):
            per_token = gpt(batch[:, :-1], None, None, labels=batch[:, 1:])  # [B, S]
            loss_sum += per_token.double().sum().item()
            tokens += per_token.numel()
    return loss_sum, tokens


def _gather_tensor_parallel(local_LU: torch.Tensor) -> torch.Tensor:
    """``[L, U/TP]`` per tensor rank → ``[L, U]`` in rank order (each rank holds a contiguous slice)."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return local_LU
    parts = [torch.empty_like(local_LU) for _ in range(size)]
    dist.all_gather(
        parts, local_LU.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=1)


def evaluate_loss(gpt: torch.nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """Mean LM loss per token of ``batches`` over every data-parallel rank (collective)."""
    loss_sum, tokens = _run(gpt, batches, "pruned model loss")
    totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return (totals[0] / totals[1]).item()
