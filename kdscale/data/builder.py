"""Pack tokenized units into a token set's shards: dedupe, commit shard by shard, resume.

    builder = TokenSetBuilder(out, manifest, data, separator_id, dtype, expected_samples)
    for result in tokenized_units(units[builder.units_done:], ...):
        builder.add(result)
        builder.checkpoint()            # a stopped run resumes after this unit
    stats = builder.finish()

Packing, deduplication and the train/eval split are sequential by nature and run here, in unit
order. Each split's shard grows in a partial file and is committed (renamed, then recorded in
the tokens manifest's commit log) when full. After every unit, :meth:`checkpoint` makes the
partial shards and the kept-sample keys durable, then writes ``.kdscale-data/progress.json``
atomically: units done, per split the samples kept, the open shard's durable length and the
packer's pending tokens, and the counters. A run stopped anywhere (even by SIGKILL) restarts
from that point: shards committed since are kept, not rewritten (their samples are re-derived
and skipped), the open shard is cut back to its recorded length, and the duplicate set goes back
to the keys it held then. The output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import base64
import os
from functools import partial
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdscale.config.data import DataConfig
from kdscale.data.manifest import TokensManifest
from kdscale.data.packing import Packer
from kdscale.data.seen import SeenKeys
from kdscale.data.shards import TokenShardWriter, sample_key
from kdscale.data.tokenize import TokenizedUnit
from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text, read_json
from kdscale.logging import get_logger

log = get_logger(__name__)

STATE_DIR = ".kdscale-data"
SPLITS = ("train", "eval")


class SplitProgress(BaseModel):
    """Where one split stood after the last finished unit."""

    model_config = ConfigDict(extra="forbid")
    kept: int = 0  # samples kept so far (in committed shards or the open one)
    shard: int = 0  # index of the open shard
    shard_bytes: int = 0  # durable bytes of its partial file
    shard_samples: int = 0  # samples in those bytes
    pending: str = ""  # the packer's tokens not yet in a sample: base64 of little-endian uint32


class DataProgress(BaseModel):
    """``progress.json``: the state after the last finished unit (what a stopped run resumes)."""

    model_config = ConfigDict(extra="forbid")
    source_digest: str
    unit_bytes: int
    units_done: int = 0
    keys: int = 0  # kept-sample keys in the duplicate set
    documents: int = 0
    tokens: int = 0
    duplicate_samples: int = 0
    splits: dict[str, SplitProgress] = Field(default_factory=lambda: {s: SplitProgress() for s in SPLITS})

    @classmethod
    def load(cls, out: Path) -> "DataProgress | None":
        """The progress of a stopped run in ``out``, or None when none was recorded."""
        path = out / STATE_DIR / "progress.json"
        if not path.is_file():
            return None
        try:
            return cls.model_validate(read_json(path, "data progress"))
        except ValidationError as exc:
            raise KDScaleError(
                f"data progress {str(path)!r} is damaged ({str(exc).splitlines()[0]}); pass "
                "--overwrite to start over"
            ) from None

    def save(self, out: Path) -> None:
        """Write ``progress.json`` atomically."""
        atomic_write_text(out / STATE_DIR / "progress.json", self.model_dump_json(indent=1) + "\n")


def _encode(tokens: np.ndarray) -> str:
    return base64.b64encode(tokens.astype("<u4").tobytes()).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<u4").astype(np.int64)


def _shard_index(path: Path, split: str) -> int:
    return int(path.name.lstrip(".").removeprefix(f"{split}-").split(".")[0])


def _restore_writer(writer: TokenShardWriter, committed: int, at: SplitProgress, out: Path) -> None:
    """Point ``writer`` at the shard to write next; remove what a stopped run left past it."""
    if committed < at.shard:
        raise KDScaleError(
            f"{out}: {committed} {writer.prefix} shards are committed, but the stopped run had "
            f"reached shard {at.shard}; the directory was changed by hand (pass --overwrite)"
        )
    resume_partial = committed == at.shard and at.shard_bytes > 0
    if resume_partial:
        partial, final = writer.partial_path(at.shard), out / writer.name(at.shard)
        if not partial.exists() and final.exists():  # renamed, killed before it was recorded
            os.replace(final, partial)
        if not partial.exists() or partial.stat().st_size < at.shard_bytes:
            raise KDScaleError(
                f"{partial}: the partial shard of the stopped run is missing or shorter than "
                "recorded; pass --overwrite to start over"
            )
    for stray in [*out.glob(f"{writer.prefix}-*.tar"), *out.glob(f".{writer.prefix}-*.tar.partial")]:
        index = _shard_index(stray, writer.prefix)
        keep = index < committed if stray.suffix == ".tar" else resume_partial and index == at.shard
        if not keep:
            stray.unlink()
    if resume_partial:
        writer.start(at.shard, at.shard_bytes, at.shard_samples)
    else:
        writer.start(committed)


class TokenSetBuilder:
    """Packs, dedupes and writes the samples of tokenized units (see the module docstring)."""

    def __init__(
        self,
        out: Path,
        manifest: TokensManifest,
        data: DataConfig,
        separator_id: int | None,
        dtype: np.dtype,
        progress: DataProgress,
        expected_samples: int,
    ) -> None:
        self.out, self.manifest, self.progress, self.dtype = out, manifest, progress, dtype
        self.seen = SeenKeys(out / STATE_DIR / "seen", expected_samples)
        self.seen.restore(progress.keys)
        self.writers, self.packers, self.committed, self.kept = {}, {}, {}, {}
        for split in SPLITS:
            at = progress.splits[split]
            record = manifest.splits[split]
            writer = TokenShardWriter(
                out, split, data.shard_samples, dtype, partial(manifest.commit_shard, out, split)
            )
            _restore_writer(writer, len(record.shards), at, out)
            self.writers[split] = writer
            self.packers[split] = Packer(data.seq_len, separator_id, _decode(at.pending))
            self.committed[split] = record.samples  # re-derived samples below this are skipped
            self.kept[split] = at.kept

    @property
    def units_done(self) -> int:
        """Units whose samples are all accounted for."""
        return self.progress.units_done

    def add(self, unit: TokenizedUnit) -> None:
        """Pack one unit's documents; keep each new sample once, in its split's shards."""
        progress = self.progress
        for ids, held_out in unit.documents():
            split = "eval" if held_out else "train"
            progress.documents += 1
            progress.tokens += len(ids)
            for sample in self.packers[split].add(ids):
                stored = sample.astype(self.dtype)
                key = sample_key(stored)
                if not self.seen.add(bytes.fromhex(key)):  # identical samples are kept once
                    progress.duplicate_samples += 1
                    continue
                if self.kept[split] >= self.committed[split]:
                    self.writers[split].write(key, stored)
                self.kept[split] += 1
        progress.units_done += 1

    def checkpoint(self) -> None:
        """Make everything up to the last added unit durable and record it as the resume point."""
        for split in SPLITS:
            shard, length, samples = self.writers[split].sync()
            pending = _encode(self.packers[split].buffer)
            self.progress.splits[split] = SplitProgress(
                kept=self.kept[split], shard=shard, shard_bytes=length, shard_samples=samples,
                pending=pending,
            )  # fmt: skip
        self.progress.keys = self.seen.sync()
        self.progress.save(self.out)

    def finish(self) -> dict[str, int]:
        """Commit the last shards; the token set's counters."""
        for writer in self.writers.values():
            writer.close()
        self.seen.close()
        progress = self.progress
        return {
            "documents": progress.documents,
            "tokens": progress.tokens,
            "duplicate_samples": progress.duplicate_samples,
            "tokens_dropped": sum(p.leftover for p in self.packers.values()),
        }
