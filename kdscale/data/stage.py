"""``kdscale data``: tokenize inputs, pack them into samples, write token shards + manifest.

    kdscale data --input stdlib:python --tokenizer smollm2-135m --seq-len 512 \\
        --eval-fraction 0.02 --out runs/tokens

Runs are deterministic (same inputs and config → byte-identical shards) and atomic: the
output directory appears only when every shard and the manifest are written.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.config.data import DataConfig
from kdscale.data.manifest import SplitRecord, TokensManifest
from kdscale.data.packing import Packer
from kdscale.data.shards import TokenShardWriter, sample_key, token_dtype
from kdscale.data.sources import Source, iter_documents, resolve_source
from kdscale.data.tokenizer import Tokenizer
from kdscale.errors import KDScaleError
from kdscale.io import atomic_directory
from kdscale.logging import get_logger
from kdscale.progress import progress_bar

log = get_logger(__name__)


def _is_held_out(ids: np.ndarray, fraction: float, separator_id: int | None) -> bool:
    """Pick held-out documents by a hash of their token ids, so the split ignores input order
    and input format (text and pre-tokenized copies of a document land on the same side)."""
    if fraction <= 0:
        return False
    if separator_id is not None and len(ids) and ids[-1] == separator_id:
        ids = ids[:-1]
    digest = hashlib.blake2b(ids.astype("<i8").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _tokenized(
    sources: list[tuple[Source, str | None]], tokenizer: Tokenizer, cfg: DataConfig
) -> Iterator[tuple[str | None, np.ndarray]]:
    """Yield ``(fixed_split, ids)`` per document, tokenizing text in batches."""
    for source, fixed_split in sources:
        batch: list[str] = []
        for doc in iter_documents(source, cfg.text_field):
            if isinstance(doc, np.ndarray):
                yield fixed_split, doc
                continue
            batch.append(doc)
            if len(batch) == cfg.batch_docs:
                yield from ((fixed_split, ids) for ids in tokenizer.encode_batch(batch))
                batch = []
        if batch:
            yield from ((fixed_split, ids) for ids in tokenizer.encode_batch(batch))


def _check_ids(ids: np.ndarray, vocab_size: int, source_hint: str) -> None:
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise KDScaleError(
            f"{source_hint}: token id {int(ids.max())} outside the tokenizer's vocabulary "
            f"[0, {vocab_size}); was it tokenized with a different tokenizer?"
        )


def run(cfg: KDScaleConfig) -> int:
    """Run the data stage described by ``cfg.data``; returns a process exit status."""
    data = cfg.data
    if not data.out:
        raise KDScaleError("data.out: required (the output directory, e.g. --out runs/tokens)")
    if not data.inputs:
        raise KDScaleError("data.inputs: at least one input is required (e.g. --input stdlib:python)")
    out = Path(data.out)
    if out.exists() and not data.overwrite:
        raise KDScaleError(f"data.out: {str(out)!r} already exists (pass --overwrite to replace it)")
    sources = [(resolve_source(s), None) for s in data.inputs]
    sources += [(resolve_source(s), "eval") for s in data.eval_inputs]
    tokenizer = Tokenizer(data.tokenizer)
    info = tokenizer.info
    separator_id = info.eos_id if data.separator == "eos" else None
    if data.separator == "eos" and separator_id is None:
        raise KDScaleError(f"data.separator='eos': tokenizer {data.tokenizer!r} has no EOS token; use 'none'")
    dtype = token_dtype(info.vocab_size)

    with atomic_directory(out, overwrite=data.overwrite) as tmp:
        manifest = _write_shards(tmp, sources, tokenizer, data, separator_id, dtype)
        manifest.write(tmp)
        write_resolved_config(cfg, tmp)
    train, held = manifest.splits["train"], manifest.splits["eval"]
    log.info(
        "wrote %s: train %d samples in %d shards, eval %d samples in %d shards (%d tokens/s)",
        out, train.samples, len(train.shards), held.samples, len(held.shards), manifest.stats["tokens_per_s"],
    )
    return 0


def _write_shards(
    tmp: Path,
    sources: list[tuple[Source, str | None]],
    tokenizer: Tokenizer,
    data: DataConfig,
    separator_id: int | None,
    dtype: np.dtype,
) -> TokensManifest:
    info = tokenizer.info
    writers = {split: TokenShardWriter(tmp, split, data.shard_samples, dtype) for split in ("train", "eval")}
    packers = {split: Packer(data.seq_len, separator_id) for split in ("train", "eval")}
    seen: set[bytes] = set()
    stats = {"documents": 0, "tokens": 0, "duplicate_samples": 0}
    start = time.perf_counter()
    with progress_bar("tokenizing", unit="tok") as bar:
        for fixed_split, ids in _tokenized(sources, tokenizer, data):
            _check_ids(ids, info.vocab_size, "data.inputs")
            held_out = _is_held_out(ids, data.eval_fraction, separator_id)
            split = fixed_split or ("eval" if held_out else "train")
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            bar.update(len(ids), tokens=len(ids))
            for sample in packers[split].add(ids):
                stored = sample.astype(dtype)
                key = sample_key(stored)
                if key.encode() in seen:  # identical samples (repeated text) are kept once
                    stats["duplicate_samples"] += 1
                    continue
                seen.add(key.encode())
                writers[split].write(key, stored)
    elapsed = max(time.perf_counter() - start, 1e-9)
    splits = {}
    for split, writer in writers.items():
        records = writer.close()
        splits[split] = SplitRecord(samples=writer.samples, tokens=writer.samples * data.seq_len, shards=records)
    if splits["train"].samples == 0:
        raise KDScaleError(
            f"data.inputs: {stats['documents']} documents, {stats['tokens']} tokens: not enough for one "
            f"training sample of seq_len+1={data.seq_len + 1} tokens"
        )
    stats["tokens_dropped"] = sum(p.leftover for p in packers.values())
    stats["tokens_per_s"] = int(stats["tokens"] / elapsed)
    return TokensManifest(
        tokenizer=data.tokenizer,
        tokenizer_fingerprint=info.fingerprint,
        vocab_size=info.vocab_size,
        eos_id=separator_id,
        separator=data.separator,
        seq_len=data.seq_len,
        dtype=dtype.str,
        splits=splits,
        stats=stats,
        inputs=list(data.inputs) + [f"eval:{s}" for s in data.eval_inputs],
    )
