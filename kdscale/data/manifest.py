"""The tokens manifest: what a directory of token shards holds and how to trust it."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from kdscale.errors import KDScaleError
from kdscale.manifest import Manifest


class ShardRecord(BaseModel):
    """One committed token shard."""

    model_config = ConfigDict(extra="forbid")
    name: str
    samples: int
    bytes: int
    sha256: str


class SplitRecord(BaseModel):
    """A split (``train`` or ``eval``): its shards in order."""

    model_config = ConfigDict(extra="forbid")
    samples: int = 0
    tokens: int = 0
    shards: list[ShardRecord] = []


class TokensManifest(Manifest):
    """``manifest.json`` of a token-shard directory (see DESIGN.md "Token shards")."""

    FORMAT = "kdscale.tokens/1"
    PRODUCER = "kdscale data"
    UNSIGNED = frozenset({"tokenizer", "stats", "inputs"})  # names and run statistics
    format: str = FORMAT
    tokenizer: str
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int | None
    separator: str
    seq_len: int
    dtype: str
    splits: dict[str, SplitRecord]
    stats: dict[str, int]
    inputs: list[str]

    def shard_paths(self, root: str | Path, split: str) -> list[Path]:
        """Paths of a split's shards under ``root``."""
        if split not in self.splits:
            raise KDScaleError(f"{root}: no {split!r} split (have: {', '.join(self.splits)})")
        return [Path(root) / s.name for s in self.splits[split].shards]


def load_tokens_manifest(root: str | Path) -> TokensManifest:
    """Read and validate a token directory's manifest."""
    return TokensManifest.load(root)
