"""``model`` section: a Llama-family GPT (RMSNorm, SwiGLU, RoPE, GQA) for megatron-core."""

from typing import Literal

from pydantic import Field, model_validator

from kdscale.config.base import Section

# Model fields that change the tensors a checkpoint holds (numerics and dropout may differ).
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "tie_embeddings",
)  # fmt: skip


class ModelConfig(Section):
    """Architecture and numerics of a megatron-core GPT student (or teacher)."""

    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    hidden_size: int = Field(64, ge=1, description="Model width.")
    ffn_hidden_size: int = Field(176, ge=1, description="SwiGLU inner width.")
    num_attention_heads: int = Field(4, ge=1, description="Query heads.")
    num_query_groups: int = Field(2, ge=1, description="Key/value heads (GQA groups).")
    kv_channels: int | None = Field(
        None, ge=1, description="Per-head width; default hidden_size / num_attention_heads."
    )
    vocab_size: int = Field(
        256,
        ge=2,
        description="Vocabulary size, used exactly (never padded): the KD loss and the teacher "
        "cache index the same ids, so it must be divisible by parallel.tensor.",
    )
    max_position_embeddings: int = Field(4096, ge=1, description="Longest sequence for RoPE.")
    rotary_base: float = Field(10000.0, gt=0, description="RoPE theta.")
    norm_epsilon: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(True, description="Share input embedding and output layer.")
    init_method_std: float = Field(0.02, gt=0, description="Std of the normal weight init.")
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
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; set kv_channels"
            )
        return self
