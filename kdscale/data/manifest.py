"""The tokens manifest: what a directory of token shards holds, whether it is complete, and how to
trust it.

``kdscale data`` writes the header first (``complete: false``), commits each shard as it is
written (one commit-log record, :mod:`kdscale.manifest`) and sets ``complete: true`` at the end.
Consumers (``cache``, ``train``, ``prune``) read it with :func:`load_tokens_manifest`, which
refuses a token set that is not complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

    FORMAT = "kdscale.tokens/2"  # 2: sealed fields, sources and units (round 2)
    PRODUCER = "kdscale data"
    # Names, run statistics and provenance: the fingerprint is the token set's identity, so the
    # same samples from other input files or paths (``source_digest``) have the same fingerprint.
    UNSIGNED = frozenset({"tokenizer", "stats", "inputs", "source_digest"})
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
    complete: bool = True  # false while `kdscale data` is still writing (or was stopped)
    source_digest: str = ""  # what decided the output: data config and the inputs' sizes/times

    def apply(self, record: dict[str, Any]) -> None:
        """Record one committed shard: ``{"split", "index", "shard"}`` (its position in the split)."""
        split = self.splits.setdefault(record["split"], SplitRecord())
        shard, index = ShardRecord.model_validate(record["shard"]), record["index"]
        if index < len(split.shards):  # already folded into manifest.json
            if split.shards[index] != shard:
                raise ValueError(f"{record['split']} shard {index} differs from manifest.json")
            return
        if index != len(split.shards):
            raise ValueError(f"{record['split']} shard {index} follows shard {len(split.shards) - 1}")
        split.shards.append(shard)
        split.samples += shard.samples
        split.tokens += shard.samples * self.seq_len

    def commit_shard(self, root: str | Path, split: str, shard: ShardRecord) -> None:
        """Record a shard that is in place under ``root`` (constant cost)."""
        index = len(self.splits[split].shards) if split in self.splits else 0
        self.commit(root, {"split": split, "index": index, "shard": shard.model_dump()})

    def shard_paths(self, root: str | Path, split: str) -> list[Path]:
        """Paths of a split's shards under ``root``."""
        if split not in self.splits:
            raise KDScaleError(f"{root}: no {split!r} split (have: {', '.join(self.splits)})")
        return [Path(root) / s.name for s in self.splits[split].shards]


def load_tokens_manifest(root: str | Path) -> TokensManifest:
    """Read and validate a token directory's manifest; an incomplete token set is refused."""
    manifest = TokensManifest.load(root)
    if not manifest.complete:
        shards = sum(len(split.shards) for split in manifest.splits.values())
        raise KDScaleError(
            f"{root}: incomplete token set ({shards} shards so far): `kdscale data` has not "
            "finished; run the same `kdscale data` command again to complete it"
        )
    return manifest
