"""``train`` section: student training (``kdscale train``) on megatron-core or DeepSpeed ZeRO.

The objective comes from the ``loss`` section, the student from ``model`` (with
``engine: deepspeed``, from ``train.deepspeed.model``), the layout from ``parallel``; this
section holds the engine, the data, the optimizer, the schedule and what to save.
"""

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kdscale.config.base import RUNTIME, InvalidKey, Section


class LRConfig(Section):
    """Learning-rate schedule (``train.lr``): linear warmup from 0, then decay to ``min_lr``.

    The rate of optimizer step k (1-based) is the schedule at k: warmup reaches ``lr`` at step
    ``warmup_steps``; the decay ends at ``min_lr`` on the last step (``train.steps``).
    """

    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to lr.")
    decay: Literal["cosine", "linear", "wsd", "constant"] = Field(
        "cosine",
        description="After warmup: cosine or linear to min_lr, wsd (constant, then decay over "
        "the last wsd_decay_fraction of steps), or constant.",
    )
    wsd_decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="decay=wsd: fraction of train.steps spent decaying."
    )
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = Field(
        "linear", description="decay=wsd: the shape of the final decay."
    )

    @model_validator(mode="after")
    def _min_below_peak(self) -> "LRConfig":
        if self.min_lr > self.lr:
            raise InvalidKey("min_lr", self.min_lr, f"must not exceed train.lr.lr={self.lr}")
        return self


class OptimizerSection(Section):
    """Adam with decoupled weight decay and global-norm clipping (``train.optimizer``)."""

    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam β1.")
    adam_beta2: float = Field(0.95, ge=0.0, lt=1.0, description="Adam β2.")
    adam_eps: float = Field(1e-8, gt=0.0, description="Adam ε.")
    weight_decay: float = Field(
        0.1, ge=0.0, description="Weight decay (not applied to norms and biases)."
    )
    clip_grad: float = Field(1.0, ge=0.0, description="Clip the global gradient norm (0 = off).")


class DeepSpeedSection(Section):
    """The DeepSpeed ZeRO engine (``train.deepspeed``; used when ``train.engine=deepspeed``).

    The student is a transformers causal LM trained data-parallel over every rank (no tensor
    or pipeline parallelism); loss, data order, LR schedule, metrics and checkpoint layout are
    those of the megatron engine.
    """

    zero_stage: Literal[1, 2, 3] = Field(
        2,
        description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters "
        "over data-parallel ranks.",
    )
    model: str | None = Field(
        None,
        description="Starting weights and architecture: a Hugging Face Llama directory, a "
        "fixture name (smollm2-135m) or a kdscale model directory (import-hf, prune or a "
        "megatron run); None builds a random Llama from the model section.",
    )
    export_hf: bool = Field(
        True, description="When the run reaches train.steps, write the model to out/hf (an HF "
        "directory for transformers).",
    )


class DataSource(Section):
    """One source of a weighted blend (``train.sources``): a token set, its cache, its weight."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9_-]+$", description="Name in metrics (eval/<name>/lm_loss, ...)."
    )
    tokens: str = Field(..., min_length=1, description="Token-shard directory of this source.")
    cache: str | None = Field(
        None, description="Teacher-target cache of these tokens (all sources or none have one)."
    )
    weight: float = Field(
        ...,
        gt=0,
        description="Share of every global batch, relative to the other sources' weights.",
    )


class TrainConfig(Section):
    """Student training: data, batch, optimizer, schedule, checkpoints, evaluation, logging."""

    engine: Literal["megatron", "deepspeed"] = Field(
        "megatron",
        description="megatron: megatron-core student at any tensor × pipeline × data layout; "
        "deepspeed: a transformers model under DeepSpeed ZeRO, data parallel only "
        "(see train.deepspeed).",
    )
    deepspeed: DeepSpeedSection = Field(
        default_factory=DeepSpeedSection, description="DeepSpeed ZeRO engine settings."
    )
    tokens: str = Field("", description="Token-shard directory (output of `kdscale data`).")
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Train on the first N samples of the train split only (in stored order): "
        "every epoch is a seeded permutation of those N and no other sample is ever read, so "
        "train.steps × global_batch / N epochs (None: the whole split).",
    )
    cache: str | None = Field(
        None,
        description="Teacher-target cache directory (output of `kdscale cache`); None trains "
        "with the LM loss only.",
    )
    sources: list[DataSource] = Field(
        default_factory=list,
        description="A weighted blend of token sets (instead of train.tokens / train.cache): "
        "each global batch takes every source's share by weight, within one sample.",
    )
    teacher_fingerprint: str | None = Field(
        None, description="Refuse a cache whose teacher fingerprint differs from this one."
    )
    out: str = Field(
        "", description="Run directory: resolved config, metrics.jsonl, checkpoints/."
    )
    steps: int = Field(
        1000, ge=0, description="Optimizer steps of the whole run (0: save the initial model)."
    )
    global_batch: int = Field(
        8, ge=1, description="Samples per optimizer step, over all data-parallel ranks."
    )
    micro_batch: int = Field(
        1, ge=1, description="Samples per forward pass on one rank (global_batch / (micro_batch "
        "× data-parallel size) micro-batches per step are accumulated).",
    )
    seed: int = Field(
        1234, ge=0, description="Seeds the initial weights and the order of samples per epoch."
    )
    lr: LRConfig = Field(default_factory=LRConfig, description="Learning-rate schedule.")
    optimizer: OptimizerSection = Field(
        default_factory=OptimizerSection, description="Adam settings."
    )
    use_distributed_optimizer: bool = Field(
        False,
        description="Shard optimizer state over data-parallel ranks (megatron's distributed "
        "optimizer; checkpointing it needs Transformer Engine or Apex).",
    )
    init: str | None = Field(
        None,
        description="Start from these weights instead of a random init: a kdscale checkpoint "
        "(a model directory, a run directory, its checkpoints/ or one step directory), or a "
        "Hugging Face directory or fixture name (imported once); ignored on resume.",
    )
    resume: Literal["auto", "never", "required"] = Field(
        "auto",
        description="auto: continue from out/checkpoints/latest when it exists; never: refuse "
        "a run directory that has checkpoints; required: fail if there is none.",
        json_schema_extra=RUNTIME,
    )
    save_every: int = Field(
        1000, ge=0, description="Save a checkpoint every N steps (0: only at the end).",
        json_schema_extra=RUNTIME,
    )
    keep_checkpoints: int | None = Field(
        None, ge=1, description="Keep only the newest N checkpoints (None: keep all).",
        json_schema_extra=RUNTIME,
    )
    exit_interval: int | None = Field(
        None,
        ge=1,
        description="Save and exit once the step is a multiple of N (fits a run into a "
        "scheduler's time slot); run the same command again to continue.",
        json_schema_extra=RUNTIME,
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Evaluate on the eval split every N steps and at the end (0: never).",
        json_schema_extra=RUNTIME,
    )
    eval_batches: int | None = Field(
        None,
        ge=1,
        description="Global batches of the eval split to evaluate (None: all of it).",
        json_schema_extra=RUNTIME,
    )
    log_every: int = Field(
        10, ge=1, description="Log metrics every N steps.", json_schema_extra=RUNTIME
    )
    stop_check_every: int = Field(
        10,
        ge=1,
        description="How often (in steps) the ranks agree on a pending SIGTERM/SIGUSR1; a stop is "
        "also noticed at every log step. The check is one small all-reduce (a host sync).",
        json_schema_extra=RUNTIME,
    )
    prefetch_steps: int = Field(
        2,
        ge=0,
        description="Steps of batches a background thread prepares ahead (0: none).",
        json_schema_extra=RUNTIME,
    )
    peak_flops: float = Field(
        989e12,
        gt=0,
        description="Peak FLOP/s of one device, the MFU denominator (default: H100 SXM dense "
        "bf16); on CPU or other devices MFU is an estimate against this figure.",
        json_schema_extra=RUNTIME,
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="`kdscale train` outside torchrun starts this many local ranks itself.",
        json_schema_extra=RUNTIME,
    )

    @field_validator("micro_batch")
    @classmethod
    def _micro_batch_divides(cls, micro_batch: int, info: ValidationInfo) -> int:
        global_batch = info.data.get("global_batch")
        if global_batch is not None and global_batch % micro_batch:
            raise ValueError(f"must divide train.global_batch={global_batch}")
        return micro_batch

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> "TrainConfig":
        if not self.sources:
            return self
        for key in ("tokens", "cache", "max_samples"):
            value = getattr(self, key)
            if value:
                raise InvalidKey(
                    key, value, "train.sources (a blend of all its sources' samples) replaces it; "
                    "set one or the other",
                )  # fmt: skip
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise InvalidKey("sources", names, "source names must differ")
        return self

    @field_validator("lr")
    @classmethod
    def _warmup_fits(cls, lr: LRConfig, info: ValidationInfo) -> LRConfig:
        steps = info.data.get("steps")
        if steps and lr.warmup_steps >= steps:
            raise InvalidKey(
                "warmup_steps", lr.warmup_steps, f"must be below train.steps={steps}"
            )
        return lr
