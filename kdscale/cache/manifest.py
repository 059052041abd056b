"""The cache manifest: what a teacher-target cache holds, what it was made from, and what is done.

The driver of ``kdscale cache`` is its only writer: it writes the header, commits each shard as
one commit-log record (:mod:`kdscale.manifest`; constant cost however many shards exist) and
folds the log into ``manifest.json`` at the end, so the manifest is always a consistent record
of the shards that exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from kdscale.manifest import Manifest


class Fidelity(BaseModel):
    """How faithful a shard's sparse targets are to the full teacher distribution."""

    model_config = ConfigDict(extra="forbid")
    positions: int
    covered_mass_mean: float
    covered_mass_min: float
    kl_mean: float | None  # None for ``sampled``: its support drops mass, so the KL is infinite
    kl_max: float | None
    tv_mean: float
    support_mean: float
    quant_kl_mean: float  # KL(kept targets ‖ stored targets): the value quantization's share


class CacheShardRecord(BaseModel):
    """One committed cache shard (same name stem and sample keys as its token shard)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    split: str
    token_shard: str
    status: str = "committed"
    samples: int
    tokens: int
    bytes: int
    sha256: str
    fidelity: Fidelity
    host: str | None = None  # the machine whose actor wrote it (None: written before it was recorded)


class CacheHeader(BaseModel):
    """Everything a cache's targets depend on; two runs may share a cache only if these agree."""

    model_config = ConfigDict(extra="forbid")
    tokens_fingerprint: str
    tokenizer_fingerprint: str
    teacher: str
    teacher_fingerprint: str
    vocab_size: int
    codec_params: dict[str, Any]
    codec_fingerprint: str
    codec: dict[str, Any]  # the full CodecConfig, to decode with (zstd level etc. included)

    def differences(self, other: "CacheHeader") -> list[str]:
        """``field: mine vs other`` for every field that changes the targets."""
        mine, theirs = self.model_dump(exclude={"codec"}), other.model_dump(exclude={"codec"})
        diffs = []
        for key in mine:
            if key == "codec_params" and mine[key] != theirs[key]:
                params = sorted(set(mine[key]) | set(theirs[key]))
                diffs += [
                    f"codec.{p}: {mine[key].get(p)!r} vs {theirs[key].get(p)!r}"
                    for p in params
                    if mine[key].get(p) != theirs[key].get(p)
                ]
            elif key != "codec_fingerprint" and mine[key] != theirs[key]:
                diffs.append(f"{key}: {mine[key]!r} vs {theirs[key]!r}")
        return diffs


class CacheManifest(Manifest):
    """``manifest.json`` of a cache directory (see DESIGN.md "Cache shards")."""

    FORMAT = "kdscale.cache/2"  # 2: sealed header, shard hosts (round 2)
    PRODUCER = "kdscale cache"
    UNSIGNED = frozenset({"tokens_dir"})  # where the tokens were; header.tokens_fingerprint says which
    format: str = FORMAT
    header: CacheHeader
    tokens_dir: str
    shards: dict[str, CacheShardRecord] = {}

    def apply(self, record: dict[str, Any]) -> None:
        """Record one committed shard (a :class:`CacheShardRecord` as a dict)."""
        shard = CacheShardRecord.model_validate(record)
        self.shards[shard.name] = shard

    def commit_shard(self, root: str | Path, shard: CacheShardRecord) -> None:
        """Record a shard that is in place under ``root`` (constant cost)."""
        self.commit(root, shard.model_dump(mode="json"))


def load_cache_manifest(root: str | Path) -> CacheManifest:
    """Read and validate a cache directory's manifest."""
    return CacheManifest.load(root)
