"""``kdscale prune``: score a model on calibration tokens, cut it to the target shape, save it.

    kdscale prune --model runs/smollm2 --tokens runs/tokens --out runs/pruned \\
        --layers 20 --ffn 1024 --heads 6 --groups 2 --samples 64
    torchrun --nproc-per-node 2 -m kdscale.cli prune ... --set parallel.tensor=2   # same result

Writes a model directory (as ``kdscale import-hf`` does) plus ``importance.json`` (scores, kept
units, calibration loss before and after, timings) and ``importance.png``. Bad targets are
refused before any model is loaded. With ``prune.search.enabled`` the shape is chosen by a
search (:mod:`kdscale.prune.search`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from kdscale.config import KDScaleConfig
from kdscale.logging import get_logger
from kdscale.models.parallel import parallel_session
from kdscale.prune.prune import target_model
from kdscale.prune.scoring import calibration_samples, prepare, score_source, write_pruned

log = get_logger(__name__)


def prune_model(cfg: KDScaleConfig) -> dict[str, Any]:
    """Run the prune of ``cfg.prune`` on this job's ranks (collective); return the summary."""
    prune = cfg.prune
    ckpt, src, world = prepare(cfg)
    dst = target_model(src, prune.target, cfg.parallel, world)
    if dst.hidden_size % dst.num_attention_heads:
        log.warning(
            "hidden_size=%d is not divisible by num_attention_heads=%d: megatron runs this "
            "model, but `kdscale export-hf` cannot write it for transformers",
            dst.hidden_size,
            dst.num_attention_heads,
        )
    samples = calibration_samples(prune, src.vocab_size)
    started = time.perf_counter()
    with parallel_session(cfg.parallel, seed=prune.seed):
        scored = score_source(cfg, ckpt, src, samples)
        summary = write_pruned(cfg, scored, dst, prune.out)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
    log.info("pruned %s → %s: %s", prune.model, prune.out, json.dumps(summary["loss"]))
    return summary | {"importance": scored.importance}


def run(cfg: KDScaleConfig) -> int:
    """Stage entry point for ``kdscale prune`` (``prune.search.enabled``: candidate search)."""
    if cfg.prune.search.enabled:
        from kdscale.prune.search import run_search

        run_search(cfg)
    else:
        prune_model(cfg)
    return 0
