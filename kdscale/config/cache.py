"""``cache`` section: teacher → sparse teacher targets (``kdscale cache``).

``cache.codec`` says what is kept of each teacher distribution and how it is stored;
``cache.teacher`` says which model produces the distributions and how it runs.
"""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kdscale.config.base import RUNTIME, InvalidKey, Section
from kdscale.errors import KDScaleError


class CodecConfig(Section):
    """What a cache keeps of each next-token distribution, and how it is stored (``cache.codec``).

    ``topk`` keeps the ``k`` most likely ids; ``topp`` the smallest set covering mass ``p``
    (between ``min_k`` and ``max_k`` ids); both also keep the tail mass. ``sampled`` (RS-KD)
    keeps the distinct ids of ``draws`` draws with replacement and their counts: an unbiased
    estimate. Log-probs of ``topk``/``topp`` are quantized; ids take ceil(log2 V) bits.
    ``k = "full"`` (or ``k`` = the vocabulary size) keeps every id: full-distribution KD.
    """

    kind: Literal["topk", "topp", "sampled"] = Field(
        "topk", description="Sparsification: topk, topp (nucleus), or sampled (RS-KD)."
    )
    k: Annotated[int, Field(ge=1)] | Literal["full"] = Field(
        64,
        description="topk: ids kept per position, at most the vocabulary size; 'full' keeps the "
        "whole vocabulary (stored in id order with implicit ids).",
    )
    p: float = Field(0.95, gt=0.0, le=1.0, description="topp: probability mass to cover.")
    min_k: int = Field(1, ge=1, description="topp: fewest ids kept per position.")
    max_k: int = Field(64, ge=1, description="topp: most ids kept per position.")
    draws: int = Field(
        50, ge=1, le=65535, description="sampled: draws N with replacement per position."
    )
    seed: int = Field(
        0, ge=0, description="sampled: seed mixed with the sample key and position of each draw."
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Teacher temperature T: targets are softmax(logits / T)."
    )
    quant_step: float = Field(
        0.01,
        ge=1e-4,
        le=1.0,
        description="topk/topp: log-prob quantization step (nats) at p = 1; the step grows as "
        "quant_step / sqrt(p) up to quant_step_max. Set both equal for uniform log steps.",
    )
    quant_step_max: float = Field(
        1.0, ge=1e-4, le=8.0, description="topk/topp: the coarsest log-prob step (nats)."
    )
    block: int = Field(
        128, ge=1, le=65536, description="Positions that share one id dictionary in a member."
    )
    zstd_level: int = Field(
        9, ge=1, le=22, description="zstandard level (decoding does not depend on it)."
    )

    @model_validator(mode="after")
    def _ranges(self) -> "CodecConfig":
        if self.min_k > self.max_k:
            raise InvalidKey(
                "min_k", self.min_k, f"must not exceed cache.codec.max_k={self.max_k}"
            )
        if self.quant_step_max < self.quant_step:
            raise InvalidKey(
                "quant_step_max",
                self.quant_step_max,
                f"must be >= cache.codec.quant_step={self.quant_step}",
            )
        return self

    def support(self, vocab: int) -> int:
        """The most ids one position can keep under this config, for a vocabulary of ``vocab``;
        ``k`` or ``min_k`` beyond the vocabulary is an error."""
        needed = {"topk": ("k", self.k), "topp": ("min_k", self.min_k)}.get(self.kind)
        if needed and needed[1] != "full" and needed[1] > vocab:
            raise KDScaleError(
                f"cache.codec.{needed[0]}={needed[1]} exceeds the vocabulary size {vocab}; use "
                f"at most {vocab}" + (" or k=full" if self.kind == "topk" else "")
            )
        if self.kind == "topk":
            return vocab if self.k == "full" else self.k
        return self.max_k if self.kind == "topp" else self.draws

    def is_full(self, vocab: int) -> bool:
        """Whether every position keeps the whole vocabulary (``topk`` with ``k = V``)."""
        return self.kind == "topk" and self.support(vocab) == vocab


class TeacherConfig(Section):
    """The model that produces teacher distributions (``cache.teacher``)."""

    model: str = Field(
        "smollm2-135m",
        description="A local Hugging Face model directory or fixture name; with backend "
        "megatron also a kdscale checkpoint directory (an HF directory or fixture is imported "
        "once).",
    )
    backend: Literal["hf", "megatron"] = Field(
        "hf",
        description="Teacher implementation: 'hf' (transformers causal LM) or 'megatron' "
        "(megatron-core GPT from a kdscale checkpoint).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer of the teacher (HF dir or fixture name); default: the model dir, "
        "or a megatron checkpoint's hf/ folder written by import-hf.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights and compute dtype; log-softmax is always float32."
    )
    device: str = Field("cpu", description="torch device for the teacher, e.g. cpu or cuda:0.")
    chunk: int = Field(
        256,
        ge=1,
        description="Positions per output-layer block: peak memory holds one [batch, chunk, "
        "vocab] float32 block instead of [batch, seq, vocab].",
    )
    tensor_parallel: int = Field(
        1,
        ge=1,
        description="backend megatron: tensor-parallel size T of each teacher group (T x P Ray "
        "actors on one node); logits stay vocab-sharded and are sparsified vocab-parallel.",
    )
    pipeline_parallel: int = Field(
        1, ge=1, description="backend megatron: pipeline-parallel size P of each teacher group."
    )

    @model_validator(mode="after")
    def _group_needs_megatron(self) -> "TeacherConfig":
        if self.backend != "megatron" and self.tensor_parallel * self.pipeline_parallel > 1:
            raise InvalidKey(
                "tensor_parallel" if self.tensor_parallel > 1 else "pipeline_parallel",
                self.tensor_parallel if self.tensor_parallel > 1 else self.pipeline_parallel,
                f"a teacher group needs cache.teacher.backend=megatron (got {self.backend})",
            )
        return self

    @property
    def group_size(self) -> int:
        """Ranks (Ray actors) per teacher: tensor x pipeline."""
        return self.tensor_parallel * self.pipeline_parallel


class RayConfig(Section):
    """The Ray actor pool that runs teachers (``cache.ray``)."""

    address: str | None = Field(
        None, description="Attach to this Ray cluster (e.g. 'auto' or 'ray://head:10001'); "
        "None starts a local instance for the run."
    )
    actors: int = Field(
        1, ge=1, description="Teachers: groups of cache.teacher.tensor_parallel x pipeline_parallel "
        "actors (one actor each at the default 1 x 1)."
    )
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs reserved per actor, i.e. per teacher rank (also its torch threads)."
    )
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs reserved per actor (per teacher rank).")
    max_restarts: int = Field(
        3, ge=-1, description="Times a teacher whose actor died is re-created (a group re-formed "
        "whole) and its shard retried (-1: forever)."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance (default: all).")
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds to wait for the cluster: for `address` to accept a connection, then "
        "for resources to place every actor (a host that never joined); then a one-line error.",
    )
    temp_dir: str | None = Field(None, description="Ray's session directory for a local instance.")


class CacheConfig(Section):
    """Teacher-target caching: what to score, how to store it, and who runs the teacher."""

    tokens: str = Field("", description="Token-shard directory (output of `kdscale data`).")
    out: str = Field("", description="Cache directory (created; resumed when it exists).")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "eval"], description="Token splits to cache."
    )
    batch_size: int = Field(4, ge=1, description="Samples per teacher forward pass.")
    probe_every: int = Field(
        16, ge=1, description="Fidelity (KL to the full teacher) is measured every N positions."
    )
    restart: bool = Field(
        False, description="Discard an existing cache made with another codec/teacher/token set.",
        json_schema_extra=RUNTIME,
    )
    codec: CodecConfig = Field(default_factory=CodecConfig, description="Target codec.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher model.")
    ray: RayConfig = Field(
        default_factory=RayConfig, description="Ray actor pool.", json_schema_extra=RUNTIME
    )
