"""``kdscale data``: tokenize inputs, pack them into samples, write token shards + manifest.

    kdscale data --input stdlib:python --tokenizer smollm2-135m --seq-len 512 \\
        --eval-fraction 0.02 --out runs/tokens --workers 8

The inputs are cut into work units (:mod:`kdscale.data.units`), tokenized on ``data.workers``
processes (:mod:`kdscale.data.tokenize`) and packed, deduplicated and written in unit order
(:mod:`kdscale.data.builder`), so the same inputs give byte-identical shards for any number of
workers. Shards are committed one by one into the tokens manifest, which says
``complete: false`` until the last one; consumers refuse an incomplete token set. Running the
same command again resumes a stopped run after its last finished unit (committed shards are
kept), or does nothing when the token set is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from kdscale.config import KDScaleConfig, write_resolved_config
from kdscale.config.base import runtime_keys
from kdscale.config.data import DataConfig
from kdscale.data.builder import SPLITS, STATE_DIR, DataProgress, TokenSetBuilder
from kdscale.data.manifest import SplitRecord, TokensManifest
from kdscale.data.shards import token_dtype
from kdscale.data.sources import Source, resolve_source
from kdscale.data.tokenize import TokenizeJob, tokenized_units
from kdscale.data.tokenizer import Tokenizer
from kdscale.data.units import plan_units
from kdscale.errors import KDScaleError
from kdscale.locks import LOCK_NAME, exclusive_directory
from kdscale.logging import get_logger
from kdscale.progress import progress_bar

log = get_logger(__name__)


def _source_digest(data: DataConfig, sources: list[tuple[Source, str | None]], tokenizer: str) -> str:
    """What decides the output: the data keys that are not runtime, the tokenizer, and every input
    file's path, size and modification time."""
    runtime = {key.split(".", 1)[1] for key in runtime_keys(DataConfig, "data")}
    config = data.model_dump(mode="json", exclude=runtime)
    files = [
        (split, str(path), stat.st_size, stat.st_mtime_ns)
        for source, split in sources
        for f in source.files
        for path in ([f.with_suffix(".bin"), f.with_suffix(".idx")] if source.kind == "megatron" else [f])
        for stat in [path.stat()]
    ]
    payload = json.dumps({"config": config, "tokenizer": tokenizer, "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _input_bytes(sources: list[tuple[Source, str | None]]) -> int:
    return sum(
        (f.with_suffix(".bin") if source.kind == "megatron" else f).stat().st_size
        for source, _ in sources
        for f in source.files
    )


def _clear(out: Path) -> None:
    """Remove everything in ``out`` but the lock this process holds on it."""
    for path in out.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _existing(out: Path, data: DataConfig, digest: str) -> TokensManifest | None:
    """The token set in ``out`` this run continues (None: start a new one); refuses anything else.
    Called under ``out``'s lock, which is all a new output directory holds."""
    if not [p for p in out.iterdir() if p.name != LOCK_NAME]:
        return None
    if data.overwrite:
        log.warning("data.overwrite: replacing %s", out)
        _clear(out)
        return None
    try:
        manifest = TokensManifest.load(out)
    except KDScaleError:
        manifest = None
    if manifest is None or manifest.source_digest != digest:
        made = " with other inputs or data settings" if manifest is not None else ""
        raise KDScaleError(f"data.out: {str(out)!r} already exists{made} (pass --overwrite to replace it)")
    return manifest


def run(cfg: KDScaleConfig) -> int:
    """Run the data stage described by ``cfg.data``; returns a process exit status."""
    data = cfg.data
    if not data.out:
        raise KDScaleError("data.out: required (the output directory, e.g. --out runs/tokens)")
    if not data.inputs:
        raise KDScaleError("data.inputs: at least one input is required (e.g. --input stdlib:python)")
    out = Path(data.out)
    sources = [(resolve_source(s), None) for s in data.inputs]
    sources += [(resolve_source(s), "eval") for s in data.eval_inputs]
    tokenizer = Tokenizer(data.tokenizer)
    info = tokenizer.info
    separator_id = info.eos_id if data.separator == "eos" else None
    if data.separator == "eos" and separator_id is None:
        raise KDScaleError(f"data.separator='eos': tokenizer {data.tokenizer!r} has no EOS token; use 'none'")
    dtype = token_dtype(info.vocab_size)
    units = plan_units(sources, data.text_field, data.unit_bytes)  # may refuse an input
    digest = _source_digest(data, sources, info.fingerprint)
    with exclusive_directory(out, "data.out", "kdscale data"):  # one driver per output directory
        return _build(cfg, out, units, sources, digest, tokenizer, separator_id, dtype)


def _build(
    cfg: KDScaleConfig,
    out: Path,
    units: list,
    sources: list[tuple[Source, str | None]],
    digest: str,
    tokenizer: Tokenizer,
    separator_id: int | None,
    dtype: np.dtype,
) -> int:
    """Start, resume or confirm the token set in ``out`` (whose lock this process holds)."""
    data, info = cfg.data, tokenizer.info
    manifest = _existing(out, data, digest)
    if manifest is not None and manifest.complete:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # left if stopped right at the end
        log.info("%s is complete (%d train samples); nothing to do", out, manifest.splits["train"].samples)
        return 0
    progress = DataProgress.load(out) if manifest is not None else None
    progress = progress or DataProgress(source_digest=digest, unit_bytes=data.unit_bytes)
    if progress.unit_bytes != data.unit_bytes:  # the stopped run's units, so its progress holds
        units = plan_units(sources, data.text_field, progress.unit_bytes)
    created = manifest is None
    if created:
        manifest = TokensManifest(
            tokenizer=data.tokenizer, tokenizer_fingerprint=info.fingerprint,
            vocab_size=info.vocab_size, eos_id=separator_id, separator=data.separator,
            seq_len=data.seq_len, dtype=dtype.str, splits={s: SplitRecord() for s in SPLITS},
            stats={}, inputs=list(data.inputs) + [f"eval:{s}" for s in data.eval_inputs],
            complete=False, source_digest=digest,
        )  # fmt: skip
    else:
        log.info("resuming %s after unit %d of %d", out, progress.units_done, len(units))
    try:
        (out / STATE_DIR).mkdir(exist_ok=True)
        manifest.write(out)  # the header, or the stopped run's commits folded in
        write_resolved_config(cfg, out)
        expected = _input_bytes(sources) // (2 * data.seq_len) + 1
        builder = TokenSetBuilder(out, manifest, data, separator_id, dtype, progress, expected)
        stats = _tokenize(units, builder, data, tokenizer, separator_id, dtype)
    except Exception as exc:
        # Bad input leaves nothing behind, nor does a failure (a full disk) before the first
        # commit; after one, a stopped run's work is kept for the same command to resume.
        committed = any(split.shards for split in manifest.splits.values())
        if created and (isinstance(exc, KDScaleError) or not committed):
            with contextlib.suppress(OSError):
                _clear(out)
        raise
    manifest.stats = stats
    manifest.complete = True
    manifest.write(out)
    shutil.rmtree(out / STATE_DIR)
    train, held = manifest.splits["train"], manifest.splits["eval"]
    log.info(
        "wrote %s: train %d samples in %d shards, eval %d samples in %d shards (%d tokens/s)",
        out, train.samples, len(train.shards), held.samples, len(held.shards), stats["tokens_per_s"],
    )
    return 0


def _tokenize(
    units: list,
    builder: TokenSetBuilder,
    data: DataConfig,
    tokenizer: Tokenizer,
    separator_id: int | None,
    dtype: np.dtype,
) -> dict[str, int]:
    """Tokenize the units not done yet, feed them to ``builder`` in order; the stats."""
    job = TokenizeJob(
        encoder=tokenizer.portable(), text_field=data.text_field, batch_docs=data.batch_docs,
        eval_fraction=data.eval_fraction, separator_id=separator_id,
        vocab_size=tokenizer.info.vocab_size, dtype=dtype.str,
    )  # fmt: skip
    todo = units[builder.units_done :]
    start, tokens = time.perf_counter(), 0
    bar = progress_bar("tokenizing", total=len(units), unit="unit", initial=builder.units_done)
    with bar:
        for result in tokenized_units(todo, job, data.workers):
            builder.add(result)
            builder.checkpoint()
            tokens += len(result.ids)
            bar.update(1, tokens=len(result.ids))
    stats = builder.finish()
    if not builder.manifest.splits["train"].samples:
        raise KDScaleError(
            f"data.inputs: {stats['documents']} documents, {stats['tokens']} tokens: not enough for one "
            f"training sample of seq_len+1={data.seq_len + 1} tokens"
        )
    stats["tokens_per_s"] = int(tokens / max(time.perf_counter() - start, 1e-9))
    return stats
