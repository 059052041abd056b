"""Structured pruning of a full (TP=1) megatron state dict to a smaller Llama shape.

Homogeneous, as ModelOpt's Minitron: every kept layer gets the same widths, but each layer
keeps its own best heads, groups and neurons. One hidden-channel selection applies to the
whole residual stream. Query heads never leave their key/value group: ``num_query_groups``
keeps the best groups, ``num_attention_heads`` then keeps the same number of best heads inside
each kept group. Kept units stay in their original order.

    dst = target_model(src, cfg.prune.target, cfg.parallel, world_size)  # refuses bad targets
    plan = plan_pruning(importance, src, dst, method="importance")
    pruned = apply_plan(full_state, plan, src, dst)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdscale.config import ModelConfig, ParallelConfig, PruneTarget
from kdscale.errors import KDScaleError
from kdscale.models import validate_layout
from kdscale.prune.importance import Importance

_LAYER = "decoder.layers.{i}."


def head_dim(model: ModelConfig) -> int:
    """Width of one attention head."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def target_model(
    src: ModelConfig, target: PruneTarget, parallel: ParallelConfig, world_size: int
) -> ModelConfig:
    """The pruned ModelConfig, or a KDScaleError listing every reason the target cannot be held.

    An unset ``num_attention_heads`` keeps the source's heads per group.
    """
    per_group = src.num_attention_heads // src.num_query_groups
    groups = target.num_query_groups or src.num_query_groups
    want = {
        "num_layers": target.num_layers or src.num_layers,
        "hidden_size": target.hidden_size or src.hidden_size,
        "ffn_hidden_size": target.ffn_hidden_size or src.ffn_hidden_size,
        "num_attention_heads": target.num_attention_heads or groups * per_group,
        "num_query_groups": groups,
    }
    problems = [
        f"prune.target.{key}={value} exceeds the source's {getattr(src, key)} (pruning only removes)"
        for key, value in want.items()
        if value > getattr(src, key)
    ]
    heads = want["num_attention_heads"]
    if heads % groups:
        problems.append(
            f"prune.target.num_attention_heads={heads} is not a multiple of num_query_groups={groups}"
        )
    elif heads // groups > per_group:
        problems.append(
            f"prune.target.num_attention_heads={heads} needs {heads // groups} heads per query group, "
            f"but the source has {per_group} (heads stay in their key/value group)"
        )
    if parallel.pipeline != 1 or parallel.virtual_pipeline:
        problems.append(
            f"prune runs with parallel.pipeline=1 (got {parallel.pipeline}); use TP and DP"
        )
    if problems:
        raise KDScaleError("bad prune target: " + "; ".join(problems))
    kv = head_dim(src)
    dst = src.model_copy(
        update=want | {"kv_channels": None if want["hidden_size"] == kv * heads else kv}
    )
    dst = ModelConfig.model_validate(dst.model_dump())
    validate_layout(dst, parallel, world_size)
    return dst


@dataclass
class PrunePlan:
    """Which units survive (indices into the source, ascending)."""

    layers: list[int]  # kept source layers, in order
    hidden: torch.Tensor  # [hidden']
    groups: torch.Tensor  # [L', G'] per kept layer
    heads: torch.Tensor  # [L', G', H'/G'] head index within its group, per kept group
    neurons: torch.Tensor  # [L', F']

    def to_json(self) -> dict:
        """The plan as plain lists (for the report)."""
        return {name: (v if isinstance(v, list) else v.tolist()) for name, v in vars(self).items()}


def _keep(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of the ``k`` best entries along the last dim (random ones with a generator), sorted."""
    if generator is not None:
        order = torch.stack(
            [
                torch.randperm(scores.shape[-1], generator=generator)
                for _ in range(scores[..., 0].numel())
            ]
        ).reshape(scores.shape)
    else:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return order[..., :k].sort(dim=-1).values


def plan_pruning(
    importance: Importance,
    src: ModelConfig,
    dst: ModelConfig,
    method: str = "importance",
    seed: int = 0,
) -> PrunePlan:
    """Keep the highest-scoring units of each kind (``method='random'``: a seeded random choice)."""
    gen = torch.Generator().manual_seed(seed) if method == "random" else None
    layers = _keep(importance.layers, dst.num_layers, gen).tolist()
    hidden = _keep(importance.hidden_channels(), dst.hidden_size, gen)
    groups = _keep(importance.groups(src.num_query_groups)[layers], dst.num_query_groups, gen)
    per_group = src.num_attention_heads // src.num_query_groups
    heads_LGH = importance.heads[layers].reshape(len(layers), src.num_query_groups, per_group)
    heads_kept = heads_LGH.gather(1, groups.unsqueeze(-1).expand(-1, -1, per_group))
    heads = _keep(heads_kept, dst.num_attention_heads // dst.num_query_groups, gen)
    neurons = _keep(importance.neurons[layers], dst.ffn_hidden_size, gen)
    return PrunePlan(layers=layers, hidden=hidden, groups=groups, heads=heads, neurons=neurons)


def _attention(
    qkv: torch.Tensor,
    proj: torch.Tensor,
    groups: torch.Tensor,
    heads: torch.Tensor,
    src: ModelConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``groups`` and, inside them, ``heads`` of the fused QKV rows and the proj columns."""
    kv, G = head_dim(src), src.num_query_groups
    per_group = src.num_attention_heads // G
    qkv_GRKH = qkv.reshape(G, per_group + 2, kv, -1)[groups]  # R: q heads of the group, k, v
    q = qkv_GRKH[torch.arange(len(groups)).unsqueeze(-1), heads]  # [G', H'/G', kv, hidden]
    qkv = torch.cat([q, qkv_GRKH[:, per_group:]], dim=1).flatten(0, 2)
    proj_hGRK = proj.reshape(proj.shape[0], G, per_group, kv)[:, groups]
    proj = proj_hGRK[:, torch.arange(len(groups)).unsqueeze(-1), heads].flatten(1)
    return qkv, proj


def apply_plan(
    full: dict[str, torch.Tensor], plan: PrunePlan, src: ModelConfig, dst: ModelConfig
) -> dict[str, torch.Tensor]:
    """The pruned full state dict (megatron local-spec names) for ``plan``."""
    h = plan.hidden
    out = {"embedding.word_embeddings.weight": full["embedding.word_embeddings.weight"][:, h]}
    for new, old in enumerate(plan.layers):
        a, b = _LAYER.format(i=old), _LAYER.format(i=new)
        qkv, proj = _attention(
            full[a + "self_attention.linear_qkv.weight"],
            full[a + "self_attention.linear_proj.weight"],
            plan.groups[new],
            plan.heads[new],
            src,
        )
        gate, up = full[a + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        n = plan.neurons[new]
        out |= {
            b + "input_layernorm.weight": full[a + "input_layernorm.weight"][h],
            b + "self_attention.linear_qkv.weight": qkv[:, h],
            b + "self_attention.linear_proj.weight": proj[h],
            b + "pre_mlp_layernorm.weight": full[a + "pre_mlp_layernorm.weight"][h],
            b + "mlp.linear_fc1.weight": torch.cat([gate[n], up[n]])[:, h],
            b + "mlp.linear_fc2.weight": full[a + "mlp.linear_fc2.weight"][h][:, n],
        }
    out["decoder.final_layernorm.weight"] = full["decoder.final_layernorm.weight"][h]
    if "output_layer.weight" in full:
        out["output_layer.weight"] = full["output_layer.weight"][:, h]
    out = {k: t.contiguous().clone() for k, t in out.items()}
    q_rows = (dst.num_attention_heads + 2 * dst.num_query_groups) * head_dim(dst)
    assert out[_LAYER.format(i=0) + "self_attention.linear_qkv.weight"].shape == (
        q_rows,
        dst.hidden_size,
    )
    return out
