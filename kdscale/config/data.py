"""``data`` section: text → packed token shards (``kdscale data``)."""

from typing import Literal

from pydantic import Field, field_validator

from kdscale.config.base import RUNTIME, Section


class DataConfig(Section):
    """How text becomes token shards. See DESIGN.md "Token shards"."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Input paths: .txt files or directories, .jsonl, .parquet, a Megatron "
        ".bin/.idx prefix (or either file), or a built-in corpus such as 'stdlib:python'.",
    )
    eval_inputs: list[str] = Field(
        default_factory=list,
        description="Inputs used only for the held-out split (instead of eval_fraction).",
    )
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of documents (chosen by content hash) held out for evaluation.",
    )
    tokenizer: str = Field(
        "smollm2-135m", description="A Hugging Face tokenizer directory or a fixture name."
    )
    seq_len: int = Field(2048, ge=2, description="Tokens per training sample (stored as seq_len+1).")
    out: str = Field("", description="Output directory for token shards and the tokens manifest.")
    shard_samples: int = Field(1024, ge=1, description="Samples per token shard.")
    text_field: str = Field("text", description="Text field of .jsonl records / .parquet column.")
    separator: Literal["eos", "none"] = Field(
        "eos",
        description="What joins documents: the model's EOS id (from its config when present), "
        "or nothing.",
    )
    batch_docs: int = Field(256, ge=1, description="Documents tokenized per batch.")
    workers: int = Field(
        1,
        ge=1,
        description="Processes that tokenize work units (1: tokenize in the driver). The output "
        "is byte-identical for any number.",
        json_schema_extra=RUNTIME,
    )
    unit_bytes: int = Field(
        16 << 20,
        ge=1,
        description="Input bytes per work unit (runs of text files, .jsonl byte ranges, parquet "
        "row groups, Megatron documents); a stopped run resumes from the last finished unit. A "
        "resumed run keeps the value it started with.",
        json_schema_extra=RUNTIME,
    )
    overwrite: bool = Field(
        False, description="Replace an existing output directory.", json_schema_extra=RUNTIME
    )

    @field_validator("inputs", "eval_inputs")
    @classmethod
    def _no_empty_paths(cls, paths: list[str]) -> list[str]:
        if any(not p.strip() for p in paths):
            raise ValueError("paths must be non-empty strings")
        return paths
