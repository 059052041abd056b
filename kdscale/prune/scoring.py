"""Score a source model once on calibration tokens, then cut it to any target shape and save it.

    ckpt, src, world = prepare(cfg)                      # cheap checks, before any model loads
    with parallel_session(cfg.parallel, seed=cfg.prune.seed):
        scored = score_source(cfg, ckpt, src, calibration_samples(cfg.prune, src.vocab_size))
        summary = write_pruned(cfg, scored, dst, out)    # one call per pruned shape

Used by ``kdscale prune`` (:mod:`kdscale.prune.stage`, one shape) and by the candidate search
(:mod:`kdscale.prune.search`, many shapes from one scoring).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kdscale.config import KDScaleConfig, ModelConfig, PruneConfig
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.store import TokenStore
from kdscale.errors import KDScaleError
from kdscale.logging import get_logger
from kdscale.models import build_gpt_model, count_parameters, validate_layout
from kdscale.models.checkpoints import HF_META, load_weights, open_model_dir, save_model_dir
from kdscale.models.tp_state import gather_full_state, load_full_state
from kdscale.prune.importance import Importance, collect_importance, evaluate_loss
from kdscale.prune.prune import apply_plan, head_dim, plan_pruning
from kdscale.prune.report import report_json, report_png

log = get_logger(__name__)


def calibration_samples(prune: PruneConfig, vocab_size: int) -> np.ndarray:
    """The first ``calibration_samples`` token samples of the split, ``[N, S + 1]`` int64."""
    manifest = load_tokens_manifest(prune.tokens)
    if manifest.vocab_size > vocab_size:
        raise KDScaleError(
            f"prune.tokens={prune.tokens} was made with a {manifest.vocab_size}-token vocabulary; "
            f"the model has {vocab_size}"
        )
    manifest.shard_paths(prune.tokens, prune.split)  # a clear error for an unknown split
    store = TokenStore(prune.tokens, manifest, prune.split)
    if len(store) == 0:
        raise KDScaleError(f"prune.tokens={prune.tokens}: split {prune.split!r} has no samples")
    count = min(prune.calibration_samples, len(store))
    if count < prune.calibration_samples:
        log.warning(
            "calibrating on all %d samples of %r (asked for %d)",
            count,
            prune.split,
            prune.calibration_samples,
        )
    length = (prune.calibration_seq_len or manifest.seq_len) + 1
    try:
        return np.stack([store.tokens(i)[:length].astype(np.int64) for i in range(count)])
    finally:
        store.close()


def _batches(samples: np.ndarray, micro_batch_size: int) -> list[torch.Tensor]:
    """This data-parallel rank's contiguous share of ``samples``, in micro-batches."""
    dp, rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    share = np.array_split(samples, dp)[rank]
    return [
        torch.from_numpy(share[i : i + micro_batch_size])
        for i in range(0, len(share), micro_batch_size)
    ]


def _check(prune: PruneConfig) -> None:
    missing = [f"prune.{k}" for k in ("model", "tokens", "out") if not getattr(prune, k)]
    if missing:
        raise KDScaleError(f"set {', '.join(missing)} (e.g. --model DIR --tokens DIR --out DIR)")
    if Path(prune.out).exists() and not prune.overwrite:
        raise KDScaleError(f"prune.out={prune.out} exists; pass --overwrite to replace it")


@dataclass
class Scored:
    """The source model, scored: what every pruned shape is cut from (inside a parallel session)."""

    ckpt: Path
    src: ModelConfig
    importance: Importance
    full: dict[str, torch.Tensor]  # the source's unsharded weights
    batches: list[torch.Tensor]  # this rank's calibration micro-batches
    samples: np.ndarray
    seconds: dict[str, float]


def score_source(cfg: KDScaleConfig, ckpt: Path, src: ModelConfig, samples: np.ndarray) -> Scored:
    """Load the source at ``cfg.parallel`` and score its units (collective; in a session)."""
    prune = cfg.prune
    started = time.perf_counter()
    batches = _batches(samples, prune.micro_batch_size)
    gpt = build_gpt_model(src, cfg.parallel, pre_process=True, post_process=True).eval()
    load_weights(ckpt, [gpt], cfg.integrity.verify_checksums)
    loaded = time.perf_counter()
    importance = collect_importance(
        gpt, batches, head_dim(src), prune.seq_aggregation, prune.batch_aggregation
    )
    seconds = {"load": round(loaded - started, 3), "score": round(time.perf_counter() - loaded, 3)}
    return Scored(ckpt, src, importance, gather_full_state(gpt), batches, samples, seconds)


def write_pruned(
    cfg: KDScaleConfig, scored: Scored, dst: ModelConfig, out: str | Path
) -> dict[str, Any]:
    """Cut ``scored`` to ``dst``, measure its calibration loss, write the model dir ``out``."""
    started = time.perf_counter()
    plan = plan_pruning(scored.importance, scored.src, dst, cfg.prune.method, cfg.prune.seed)
    small = build_gpt_model(dst, cfg.parallel, pre_process=True, post_process=True).eval()
    load_full_state(small, apply_plan(scored.full, plan, scored.src, dst))
    pruned_loss = evaluate_loss(small, scored.batches)
    summary = _summary(
        cfg,
        scored.src,
        dst,
        scored.importance.loss,
        pruned_loss,
        scored.importance.tokens,
        scored.samples,
    )
    summary["seconds"] = scored.seconds | {
        "prune_and_evaluate": round(time.perf_counter() - started, 3)
    }
    extras = None
    if dist.get_rank() == 0:
        extras = {
            "importance.json": report_json(scored.importance, plan, summary).encode(),
            "importance.png": report_png(scored.importance, plan),
        }
    hf_meta = scored.ckpt / HF_META
    origin = {"command": "prune", "source": str(scored.ckpt.resolve()), "loss": summary["loss"]}
    save_model_dir(
        out,
        cfg.model_copy(update={"model": dst}),
        small,
        origin,
        hf_meta if hf_meta.is_dir() else None,
        cfg.prune.overwrite,
        extras,
    )
    return summary | {"plan": plan}


def prepare(cfg: KDScaleConfig) -> tuple[Path, ModelConfig, int]:
    """Check the inputs cheaply: the source checkpoint, its model, the world size."""
    _check(cfg.prune)
    ckpt, src = open_model_dir(cfg.prune.model, "prune.model")
    world = (
        dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    validate_layout(src, cfg.parallel, world)
    return ckpt, src, world


def _summary(
    cfg: KDScaleConfig,
    src: ModelConfig,
    dst: ModelConfig,
    source_loss: float,
    pruned_loss: float,
    tokens: int,
    samples: np.ndarray,
) -> dict[str, Any]:
    return {
        "source": src.model_dump(),
        "target": dst.model_dump(),
        "parameters": {"source": count_parameters(src), "pruned": count_parameters(dst)},
        "calibration": {
            "split": cfg.prune.split,
            "samples": len(samples),
            "seq_len": samples.shape[1] - 1,
            "tokens": tokens,
            "seq_aggregation": cfg.prune.seq_aggregation,
            "batch_aggregation": cfg.prune.batch_aggregation,
            "method": cfg.prune.method,
            "tensor_parallel": cfg.parallel.tensor,
        },
        "loss": {"source": source_loss, "pruned": pruned_loss},
    }


