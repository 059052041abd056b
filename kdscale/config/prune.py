"""``prune`` section: Minitron-style structured pruning of a model directory."""

from typing import Literal

from pydantic import Field

from kdscale.config.base import RUNTIME, Section


class PruneTarget(Section):
    """The pruned architecture; a field left unset keeps the source's value."""

    num_layers: int | None = Field(None, ge=1, description="Blocks kept (depth pruning).")
    hidden_size: int | None = Field(None, ge=1, description="Hidden channels kept.")
    ffn_hidden_size: int | None = Field(None, ge=1, description="MLP neurons kept per layer.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads kept per layer.")
    num_query_groups: int | None = Field(
        None, ge=1, description="Key/value groups kept per layer (GQA); heads stay inside groups."
    )


class PruneSearch(Section):
    """Candidate search: prune to every shape under a parameter budget, distill each briefly off
    the same teacher cache (the ``train`` section: tokens, cache, optimizer), keep the best."""

    enabled: bool = Field(False, description="Search instead of pruning to prune.target.")
    params: int | None = Field(
        None,
        ge=1,
        description="Parameter budget of a candidate (full model, tied output counted once).",
    )
    max_width_pruning: float = Field(
        0.4, gt=0, lt=1, description="Largest fraction of hidden, ffn or heads per group removed."
    )
    max_depth_pruning: float = Field(
        0.2, ge=0, lt=1, description="Largest fraction of layers removed."
    )
    width_step: int = Field(
        64, ge=1, description="hidden_size and ffn_hidden_size candidates are multiples of this."
    )
    top_k: int = Field(
        4, ge=1, description="Candidates distilled: the largest ones within the budget."
    )
    steps: int = Field(20, ge=1, description="Distillation steps per candidate.")
    metric: Literal["lm_loss", "kl_teacher_tail"] = Field(
        "lm_loss",
        description="Held-out metric ranking the candidates: lm_loss, or kl_teacher_tail (KL to "
        "the teacher's cached top ids + tail bucket; needs train.cache).",
    )


class PruneConfig(Section):
    """Where the source model and calibration tokens are, what to keep, how to score."""

    model: str = Field(
        "",
        description="Source model: a kdscale model directory (`kdscale import-hf`), or a Hugging "
        "Face directory or fixture name (imported once).",
    )
    tokens: str = Field(
        "", description="Token-shard directory (from `kdscale data`) to calibrate on."
    )
    split: str = Field("train", description="Token split used for calibration.")
    out: str = Field("", description="Pruned model directory to write.")
    overwrite: bool = Field(
        False, description="Replace an existing output directory.", json_schema_extra=RUNTIME
    )
    target: PruneTarget = Field(default_factory=PruneTarget, description="Pruned architecture.")
    calibration_samples: int = Field(
        256, ge=1, description="Token samples scored (the first ones of the split, in order)."
    )
    calibration_seq_len: int | None = Field(
        None, ge=2, description="Truncate calibration samples to this many tokens (None: full)."
    )
    micro_batch_size: int = Field(4, ge=1, description="Samples per forward pass.")
    seq_aggregation: Literal["mean", "l2", "max"] = Field(
        "mean", description="Per sample, how |activation| is reduced over the sequence."
    )
    batch_aggregation: Literal["l2", "mean", "max"] = Field(
        "l2", description="How per-sample scores are reduced over calibration samples."
    )
    method: Literal["importance", "random"] = Field(
        "importance",
        description="'importance' keeps the highest-scoring units; 'random' keeps a seeded random "
        "choice of the same size (a baseline).",
    )
    seed: int = Field(0, description="Seed of method='random'.")
    search: PruneSearch = Field(default_factory=PruneSearch, description="Candidate search.")
