"""The importance report of a prune: ``importance.json`` and a per-layer plot ``importance.png``."""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from kdscale.prune.importance import Importance
from kdscale.prune.prune import PrunePlan


def report_json(importance: Importance, plan: PrunePlan, summary: dict[str, Any]) -> str:
    """Scores, kept units and the run summary (losses, parameters, timings) as JSON text."""
    body = {
        **summary,
        "kept": plan.to_json(),
        "scores": {
            "layers": importance.layers.tolist(),
            "heads": importance.heads.tolist(),
            "neurons": importance.neurons.tolist(),
            "hidden_per_layer": importance.hidden.tolist(),
            "hidden": importance.hidden_channels().tolist(),
        },
    }
    return json.dumps(body, indent=1) + "\n"


def _normalised(scores_LU: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by that layer's maximum (so layers share one colour scale)."""
    return scores_LU / scores_LU.amax(dim=-1, keepdim=True).clamp_min(1e-30)


def report_png(importance: Importance, plan: PrunePlan) -> bytes:
    """Four panels: block importance (kept layers dark), heads, neurons, and hidden channels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    L = importance.layers.numel()
    colors = ["tab:blue" if i in plan.layers else "tab:gray" for i in range(L)]
    axes[0, 0].bar(range(L), importance.layers.numpy(), color=colors)
    axes[0, 0].set(title="Block importance 1 − cos(in, out) (grey: pruned)", xlabel="layer")
    for ax, scores, title in (
        (axes[0, 1], importance.heads, "Attention heads (per-layer max = 1)"),
        (axes[1, 0], importance.neurons, "MLP neurons (per-layer max = 1)"),
    ):
        image = ax.imshow(_normalised(scores).numpy(), aspect="auto", interpolation="nearest")
        ax.set(title=title, xlabel="unit", ylabel="layer")
        fig.colorbar(image, ax=ax)
    hidden = importance.hidden_channels().sort(descending=True).values.numpy()
    axes[1, 1].plot(hidden)
    axes[1, 1].axvline(len(plan.hidden) - 0.5, color="tab:red", label=f"keep {len(plan.hidden)}")
    axes[1, 1].set(title="Hidden channels, sorted (sum over layers)", xlabel="rank", yscale="log")
    axes[1, 1].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
