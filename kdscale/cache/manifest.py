"""The cache manifest: what a teacher-target cache holds, what it was made from, and what is done.

The driver of ``kdscale cache`` is its only writer; it rewrites the file atomically after every
committed shard, so the manifest is always a consistent record of the shards that exist.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text

CACHE_MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "kdscale.cache/1"


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


class CacheManifest(BaseModel):
    """``manifest.json`` of a cache directory (see DESIGN.md "Cache shards")."""

    model_config = ConfigDict(extra="forbid")
    format: str = CACHE_FORMAT
    header: CacheHeader
    tokens_dir: str
    shards: dict[str, CacheShardRecord] = {}

    @property
    def fingerprint(self) -> str:
        """Content fingerprint: the header plus every committed shard's sha256."""
        payload = {"header": self.header.model_dump(exclude={"codec"}), "shards": {k: v.sha256 for k, v in sorted(self.shards.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def write(self, root: str | Path) -> None:
        """Write ``manifest.json`` atomically."""
        body = self.model_dump(mode="json") | {"fingerprint": self.fingerprint}
        atomic_write_text(Path(root) / CACHE_MANIFEST_NAME, json.dumps(body, indent=2) + "\n")


def load_cache_manifest(root: str | Path) -> CacheManifest:
    """Read and validate a cache directory's manifest; a clear error if missing or damaged."""
    path = Path(root) / CACHE_MANIFEST_NAME
    if not path.is_file():
        raise KDScaleError(f"{root}: no {CACHE_MANIFEST_NAME}; is this the output of `kdscale cache`?")
    try:
        body = json.loads(path.read_text())
        body.pop("fingerprint", None)
        manifest = CacheManifest.model_validate(body)
    except (json.JSONDecodeError, ValidationError) as exc:
        raise KDScaleError(f"{path}: damaged cache manifest ({str(exc).splitlines()[0]})") from None
    if manifest.format != CACHE_FORMAT:
        raise KDScaleError(f"{path}: format {manifest.format!r}, this kdscale reads {CACHE_FORMAT!r}")
    return manifest
