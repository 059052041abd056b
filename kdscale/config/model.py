"""``model`` section: a Llama-family GPT (RMSNorm, SwiGLU, RoPE, GQA) for megatron-core."""

from typing import Literal

from pydantic import Field, model_validator

from kdscale.config.base import NUMERICS, SHAPE, InvalidKey, Section, tagged_fields


class ModelConfig(Section):
    """Architecture and numerics of a megatron-core GPT student (or teacher)."""

    # Shape: the tensors a checkpoint holds.
    num_layers: int = Field(2, ge=1, description="Transformer blocks.", json_schema_extra=SHAPE)
    hidden_size: int = Field(64, ge=1, description="Model width.", json_schema_extra=SHAPE)
    ffn_hidden_size: int = Field(
        176, ge=1, description="SwiGLU inner width.", json_schema_extra=SHAPE
    )
    num_attention_heads: int = Field(
        4, ge=1, description="Query heads.", json_schema_extra=SHAPE
    )
    num_query_groups: int = Field(
        2, ge=1, description="Key/value heads (GQA groups).", json_schema_extra=SHAPE
    )
    kv_channels: int | None = Field(
        None,
        ge=1,
        description="Per-head width; default hidden_size / num_attention_heads.",
        json_schema_extra=SHAPE,
    )
    vocab_size: int = Field(
        256,
        ge=2,
        description="Vocabulary size, used exactly (never padded): the KD loss and the teacher "
        "cache index the same ids, so it must be divisible by parallel.tensor.",
        json_schema_extra=SHAPE,
    )
    tie_embeddings: bool = Field(
        True, description="Share input embedding and output layer.", json_schema_extra=SHAPE
    )
    # Numerics: what the same tensors compute.
    max_position_embeddings: int = Field(
        4096, ge=1, description="Longest sequence for RoPE.", json_schema_extra=NUMERICS
    )
    rotary_base: float = Field(
        10000.0, gt=0, description="RoPE theta.", json_schema_extra=NUMERICS
    )
    norm_epsilon: float = Field(
        1e-5, gt=0, description="RMSNorm epsilon.", json_schema_extra=NUMERICS
    )
    # Training-time settings: free to differ from a checkpoint's.
    init_method_std: float = Field(
        0.02,
        gt=0,
        description="Std of the normal init of every weight matrix and the embedding (Hugging "
        "Face's initializer_range).",
    )
    scaled_output_init: bool = Field(
        True,
        description="Start the attention output and MLP down projections at init_method_std / "
        "sqrt(2 * num_layers), as megatron does (0.005 for 8 layers at 0.02); false: at "
        "init_method_std like every other matrix, as Hugging Face's Llama initialises.",
    )
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="Attention dropout.")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="Hidden dropout.")
    precision: Literal["fp32", "bf16", "fp8"] = Field(
        "fp32", description="Compute precision; fp8 needs Transformer Engine on a GPU."
    )
    fp8_format: Literal["hybrid", "e4m3"] = Field(
        "hybrid",
        description="precision=fp8 only: 'hybrid' (e4m3 forward, e5m2 gradients) or 'e4m3'.",
    )
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = Field(
        "delayed", description="precision=fp8 only: Transformer Engine scaling recipe."
    )
    fp8_margin: int = Field(0, ge=0, description="precision=fp8 only: scaling-factor margin.")
    fp8_amax_history_len: int = Field(
        1024, ge=1, description="precision=fp8 only: amax history window (delayed recipe)."
    )
    fp8_amax_compute_algo: Literal["max", "most_recent"] = Field(
        "max", description="precision=fp8 only: amax from the history's max or its latest value."
    )
    transformer_impl: Literal["auto", "local", "transformer_engine"] = Field(
        "auto",
        description="Layer spec: 'auto' picks Transformer Engine when it imports and CUDA is "
        "present, else megatron's local spec.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.num_attention_heads % self.num_query_groups:
            raise InvalidKey(
                "num_attention_heads",
                self.num_attention_heads,
                f"must be a multiple of model.num_query_groups={self.num_query_groups}",
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise InvalidKey(
                "hidden_size",
                self.hidden_size,
                f"not divisible by model.num_attention_heads={self.num_attention_heads}; set "
                "model.kv_channels",
            )
        return self


def architecture_fields() -> tuple[str, ...]:
    """Model fields that change the tensors a checkpoint holds."""
    return tagged_fields(ModelConfig, "checkpoint", "shape")


def checkpoint_fields() -> tuple[str, ...]:
    """Model fields a checkpoint fixes: its tensors' shapes and what they compute (a model
    started from a checkpoint takes these from it)."""
    return architecture_fields() + tagged_fields(ModelConfig, "checkpoint", "numerics")
