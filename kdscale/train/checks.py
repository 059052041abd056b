"""Everything ``kdscale train`` and ``kdscale eval`` verify before any model is built.

Cheap and local (manifests, config arithmetic, checkpoint metadata; no process group, no
megatron), so a bad run fails in seconds with one line naming the field, the value and what
would fit: the parallel layout, the batch split, the token set against the model, the cache
against the tokens, the student and the loss, and a resumed run against what it was started on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdscale.cache.reader import Cache, open_cache
from kdscale.cache.targets import SparseTargets
from kdscale.config import KDLossConfig, KDScaleConfig, ModelConfig
from kdscale.data.manifest import TokensManifest, load_tokens_manifest
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.losses import check_cache_temperature
from kdscale.losses.checks import check_call
from kdscale.models.gpt import validate_layout
from kdscale.models.checkpoints import (
    check_architecture,
    latest_checkpoint,
    read_train_state,
    resolve_checkpoint,
)

log = get_logger(__name__)

# Cache header fields that change the targets a resumed run would see.
_CACHE_IDENTITY = ("tokens_fingerprint", "teacher_fingerprint", "codec_fingerprint", "vocab_size")


def _cache_identity(cache: Cache | None) -> dict[str, Any] | None:
    if cache is None:
        return None
    header = cache.manifest.header
    return {field: getattr(header, field) for field in _CACHE_IDENTITY} | {
        "tokenizer_fingerprint": header.tokenizer_fingerprint,
        "teacher": header.teacher,
        "codec": header.codec,
        "manifest_fingerprint": cache.manifest.fingerprint,
    }


@dataclass
class RunSource:
    """One checked data source: a token set and its cache (``name`` is empty for a run on
    ``train.tokens``; a blend's sources are named by ``train.sources``)."""

    name: str
    weight: float
    tokens_dir: str
    tokens: TokensManifest
    cache: Cache | None

    def fingerprints(self) -> dict[str, Any]:
        """Identity of the token set and its cache."""
        return {"tokens_fingerprint": self.tokens.fingerprint, "cache": _cache_identity(self.cache)}


@dataclass
class RunInputs:
    """What a checked run trains on and where it starts from."""

    sources: list[RunSource]
    blend: bool  # train.sources (a weighted blend) rather than train.tokens
    world_size: int
    data_parallel: int
    resume_from: Path | None
    init_from: Path | None
    max_samples: int | None = None

    @property
    def train_samples(self) -> int:
        """How many samples of the train split the run draws from (``train.max_samples``)."""
        return self.max_samples or self.tokens.splits["train"].samples

    @property
    def tokens(self) -> TokensManifest:
        """The first source's tokens manifest: its seq_len, tokenizer and vocabulary are every
        source's."""
        return self.sources[0].tokens

    @property
    def cache(self) -> Cache | None:
        """The first source's cache; None when the run has no teacher targets (all sources or
        none have a cache)."""
        return self.sources[0].cache

    def fingerprints(self) -> dict[str, Any]:
        """Identity of the inputs, recorded in every checkpoint and the W&B run config."""
        if not self.blend:
            return self.sources[0].fingerprints() | {"max_samples": self.max_samples}
        return {"sources": [{"name": s.name, "weight": s.weight} | s.fingerprints() for s in self.sources]}


def check_tokens(tokens_dir: str, model: ModelConfig, what: str) -> TokensManifest:
    """The token set's manifest, refused if the model cannot read it."""
    if not tokens_dir:
        raise KDScaleError(f"{what}: required (a token directory made by `kdscale data`)")
    tokens = load_tokens_manifest(tokens_dir)
    if tokens.vocab_size > model.vocab_size:
        raise KDScaleError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokens.vocab_size} ids in {tokens_dir}"
        )
    if tokens.seq_len > model.max_position_embeddings:
        raise KDScaleError(
            f"model.max_position_embeddings={model.max_position_embeddings} is shorter than the "
            f"samples of {tokens_dir} (seq_len {tokens.seq_len})"
        )
    return tokens


def check_cache(
    cache_dir: str,
    tokens_dir: str,
    tokens: TokensManifest,
    model: ModelConfig,
    loss: KDLossConfig,
    teacher_fingerprint: str | None = None,
) -> Cache:
    """Open a cache, refusing one that does not belong to these tokens, this student's
    vocabulary, the expected teacher, or the loss (temperature, target kind)."""
    cache = open_cache(
        cache_dir,
        tokens_dir,
        vocab_size=model.vocab_size,
        tokenizer_fingerprint=tokens.tokenizer_fingerprint,
        teacher_fingerprint=teacher_fingerprint,
    )
    check_cache_temperature(loss, cache.codec.temperature)
    one = torch.zeros(1, 1, 1, dtype=torch.int64)
    kind_only = SparseTargets(one, one.float(), one[..., 0].float(), cache.codec.kind)
    check_call(one.float(), kind_only, one[..., 0], None, loss)  # objective vs target kind
    return cache


def check_batch(cfg: KDScaleConfig, data_parallel: int) -> None:
    """Refuse a global batch that micro-batches × data-parallel ranks do not divide."""
    train, pp = cfg.train, cfg.parallel.pipeline
    per_step = train.micro_batch * data_parallel
    if train.global_batch % per_step:
        raise KDScaleError(
            f"train.global_batch={train.global_batch} is not a multiple of train.micro_batch × "
            f"data-parallel size = {train.micro_batch}×{data_parallel} = {per_step}"
        )
    micro_batches = train.global_batch // per_step
    if cfg.parallel.virtual_pipeline and micro_batches % pp:
        raise KDScaleError(
            f"interleaved pipeline: {micro_batches} micro-batches per step (train.global_batch / "
            f"(micro_batch × data-parallel size)) must be a multiple of parallel.pipeline={pp}"
        )


def _check_resume(ckpt: Path, cfg: KDScaleConfig, fingerprints: dict[str, Any]) -> None:
    saved = read_train_state(ckpt)
    engine = saved.get("engine", "megatron")
    if engine != cfg.train.engine:
        raise KDScaleError(
            f"train.out: {cfg.train.out} holds a train.engine={engine} run; "
            f"train.engine={cfg.train.engine} cannot resume it (use a new train.out)"
        )
    check_architecture(ckpt, cfg.model, "train.out")
    if ("sources" in saved) != ("sources" in fingerprints):
        had = "a blend (train.sources)" if "sources" in saved else "train.tokens"
        raise KDScaleError(
            f"train.sources: the run in {cfg.train.out} was trained on {had}; keep it that way "
            f"or start a new run with train.init={ckpt}"
        )
    if "sources" in saved:
        _check_resume_blend(saved["sources"], fingerprints["sources"], cfg, ckpt)
        return
    if saved["tokens_fingerprint"] != fingerprints["tokens_fingerprint"]:
        raise KDScaleError(
            f"train.tokens: {cfg.train.tokens} is not the token set the run in {cfg.train.out} "
            "was trained on (its data position would be meaningless); start a new run with "
            f"train.init={ckpt}"
        )
    if saved.get("max_samples") != fingerprints["max_samples"]:
        raise KDScaleError(
            f"train.max_samples={fingerprints['max_samples']}: the run in {cfg.train.out} draws "
            f"from max_samples={saved.get('max_samples')} (its data position would be "
            f"meaningless otherwise); keep that value or start a new run with train.init={ckpt}"
        )
    before, now = saved["cache"], fingerprints["cache"]
    if (before is None) != (now is None):
        had = "with a cache" if before else "without a cache"
        raise KDScaleError(
            f"train.cache: the run in {cfg.train.out} was trained {had}; keep it that way or "
            f"start a new run with train.init={ckpt}"
        )
    for field in _CACHE_IDENTITY if before else ():
        if before[field] != now[field]:
            raise KDScaleError(
                f"train.cache: {field} is {now[field]!r}, the run in {cfg.train.out} was "
                f"trained on {before[field]!r}; start a new run with train.init={ckpt}"
            )


def _check_resume_blend(
    before: list[dict[str, Any]], now: list[dict[str, Any]], cfg: KDScaleConfig, ckpt: Path
) -> None:
    """A blend resumes only on the same sources, weights, token sets and caches."""
    names = [s["name"] for s in before], [s["name"] for s in now]
    if names[0] != names[1]:
        raise KDScaleError(
            f"train.sources: the run in {cfg.train.out} was trained on sources {names[0]}, not "
            f"{names[1]}; start a new run with train.init={ckpt}"
        )
    for old, new in zip(before, now):
        caches = (old["cache"] or {}), (new["cache"] or {})
        fields = [("weight", old["weight"], new["weight"]),
                  ("tokens_fingerprint", old["tokens_fingerprint"], new["tokens_fingerprint"]),
                  ("cache", old["cache"] is not None, new["cache"] is not None)]  # fmt: skip
        fields += [(f"cache.{f}", caches[0].get(f), caches[1].get(f)) for f in _CACHE_IDENTITY]
        for field, was, is_now in fields:
            if was != is_now:
                raise KDScaleError(
                    f"train.sources[{new['name']}]: {field} is {is_now!r}, the run in "
                    f"{cfg.train.out} was trained on {was!r}; start a new run with train.init={ckpt}"
                )


def _check_source(
    cfg: KDScaleConfig, name: str, weight: float, tokens_dir: str, cache_dir: str | None
) -> RunSource:
    """One source's token set and cache, checked against the model, the loss and each other."""
    where = f"train.sources[{name}]." if name else "train."
    tokens = check_tokens(tokens_dir, cfg.model, f"{where}tokens")
    if not tokens.splits["train"].samples:
        raise KDScaleError(f"{where}tokens: {tokens_dir} has no training samples")
    cache = None
    if cache_dir:
        try:
            cache = check_cache(
                cache_dir, tokens_dir, tokens, cfg.model, cfg.loss, cfg.train.teacher_fingerprint
            )
            cache.shard_names("train")  # every training shard must be committed
        except KDScaleError as exc:
            raise KDScaleError(f"{where}cache: {exc}" if name else str(exc)) from None
    return RunSource(name, weight, tokens_dir, tokens, cache)


def _check_blend(sources: list[RunSource]) -> None:
    """A blend's sources share a tokenizer, vocabulary and seq_len, and all or none have a
    cache, made by one teacher with one codec kind."""
    first = sources[0]
    for other in sources[1:]:
        for field in ("tokenizer_fingerprint", "vocab_size", "seq_len"):
            a, b = getattr(first.tokens, field), getattr(other.tokens, field)
            if a != b:
                raise KDScaleError(
                    f"train.sources: {first.name} and {other.name} were tokenized differently "
                    f"({field}: {a!r} vs {b!r}); a blend needs one tokenizer and one seq_len"
                )
    cached = [s.name for s in sources if s.cache is not None]
    if cached and len(cached) != len(sources):
        bare = [s.name for s in sources if s.cache is None]
        raise KDScaleError(
            f"train.sources: {', '.join(cached)} have a cache, {', '.join(bare)} do not; give every "
            "source a cache (or none, for the LM loss alone)"
        )
    for other in sources[1:] if cached else []:
        mine, theirs = first.cache.manifest.header, other.cache.manifest.header
        for field, a, b in (("teacher_fingerprint", mine.teacher_fingerprint, theirs.teacher_fingerprint),
                            ("codec.kind", mine.codec.get("kind"), theirs.codec.get("kind"))):  # fmt: skip
            if a != b:
                raise KDScaleError(
                    f"train.sources: the caches of {first.name} and {other.name} differ in "
                    f"{field} ({a!r} vs {b!r}); a blend distills one teacher with one codec kind"
                )


def check_sources(cfg: KDScaleConfig) -> list[RunSource]:
    """The run's data: ``train.tokens`` and ``train.cache``, or every source of ``train.sources``."""
    train = cfg.train
    if not train.sources:
        sources = [_check_source(cfg, "", 1.0, train.tokens, train.cache)]
    else:
        sources = [_check_source(cfg, s.name, s.weight, s.tokens, s.cache) for s in train.sources]
        _check_blend(sources)
    if sources[0].cache is None and cfg.loss.max_kd_weight() > 0:
        log.warning("no train.cache: training with the LM loss only (loss.kd_weight is unused)")
    return sources


def check_run(cfg: KDScaleConfig, world_size: int) -> RunInputs:
    """Verify a training run before any work; raise KDScaleError naming the first problem."""
    train = cfg.train
    if not train.out:
        raise KDScaleError("train.out: required (the run directory, e.g. --out runs/student)")
    validate_layout(cfg.model, cfg.parallel, world_size)
    data_parallel = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
    check_batch(cfg, data_parallel)
    sources = check_sources(cfg)
    available = sources[0].tokens.splits["train"].samples
    if train.max_samples is not None and train.max_samples > available:
        raise KDScaleError(
            f"train.max_samples={train.max_samples} exceeds the {available} training samples of "
            f"{train.tokens}; lower it, or leave it unset to train on all of them"
        )
    resume = latest_checkpoint(train.out)
    if resume is not None and train.resume == "never":
        raise KDScaleError(
            f"train.resume='never' but {train.out} already has checkpoints ({resume.name}); "
            "choose a new train.out or set train.resume=auto"
        )
    if resume is None and train.resume == "required":
        raise KDScaleError(f"train.resume='required' but {train.out} has no checkpoint")
    inputs = RunInputs(
        sources, bool(train.sources), world_size, data_parallel, resume, None, train.max_samples
    )
    if resume is not None:
        _check_resume(resume, cfg, inputs.fingerprints())
    elif train.init:
        inputs.init_from = resolve_checkpoint(train.init, "train.init")
        check_architecture(inputs.init_from, cfg.model, "train.init")
    return inputs


def start_note(cfg: KDScaleConfig, inputs: RunInputs, weights: str | None, key: str) -> str:
    """What the student starts from, said once at the start of a run: the checkpoint it resumes,
    the weights ``key`` names (``weights``), or a random init."""
    if inputs.resume_from is not None:
        return f"resumes {inputs.resume_from}"
    if weights is not None:
        return f"starts from the weights of {weights} ({key})"
    model = cfg.model
    return (
        f"starts from a random init (model.init_method_std={model.init_method_std}, "
        f"model.scaled_output_init={str(model.scaled_output_init).lower()}, "
        f"train.seed={cfg.train.seed}); set {key} to start from a model"
    )
