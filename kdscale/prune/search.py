"""``kdscale prune --search``: pick the pruned shape by short distillation, not by guesswork.

Minitron's recipe, which ModelOpt skips as too costly ("Knowledge Distillation on ~2B tokens for
all top K candidates"): enumerate homogeneous shapes within the width/depth pruning limits and
the parameter budget, prune the ``top_k`` largest from one importance scoring, distill each for
``steps`` steps with the ``train`` section (the same teacher cache for all: only student
compute is spent), and rank them by a held-out metric.

    kdscale prune --search --model runs/smollm2 --tokens runs/tokens --out runs/search \\
        --set prune.search.params=70000000 --set train.tokens=runs/tokens \\
        --set train.cache=runs/cache --set prune.search.metric=kl_teacher_tail

Writes ``OUT/candidates/<name>/{model,run}`` and ``OUT/search.json`` / ``OUT/search.md`` (the
table, winner marked); the winner's pruned model is ``OUT/candidates/<winner>/model`` and its
distilled run ``OUT/candidates/<winner>/run``.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from kdscale.config import KDScaleConfig, ModelConfig, ParallelConfig, PruneSearch, PruneTarget
from kdscale.errors import KDScaleError
from kdscale.io import atomic_write_text
from kdscale.logging import get_logger
from kdscale.models import count_parameters
from kdscale.models.parallel import parallel_session
from kdscale.prune.prune import target_model
from kdscale.prune.scoring import calibration_samples, prepare, score_source, write_pruned

log = get_logger(__name__)


def _widths(size: int, step: int, max_pruning: float) -> list[int]:
    """``size`` and the multiples of ``step`` below it down to ``(1 − max_pruning)·size``."""
    low = math.ceil((1 - max_pruning) * size)
    return [size] + [w for w in range(size // step * step, low - 1, -step) if 0 < w < size]


def candidate_shapes(
    src: ModelConfig, search: PruneSearch, parallel: ParallelConfig, world_size: int
) -> list[ModelConfig]:
    """The ``top_k`` largest shapes within the budget and pruning limits that the layout holds
    and transformers can load, largest first."""
    if search.params is None:
        raise KDScaleError("prune.search.enabled needs prune.search.params (the parameter budget)")
    per_group = src.num_attention_heads // src.num_query_groups
    grid = itertools.product(
        range(src.num_layers, math.ceil((1 - search.max_depth_pruning) * src.num_layers) - 1, -1),
        _widths(src.hidden_size, search.width_step, search.max_width_pruning),
        _widths(src.ffn_hidden_size, search.width_step, search.max_width_pruning),
        range(per_group, math.ceil((1 - search.max_width_pruning) * per_group) - 1, -1),
    )
    shapes = []
    for layers, hidden, ffn, heads_per_group in grid:
        target = PruneTarget(
            num_layers=layers,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_attention_heads=heads_per_group * src.num_query_groups,
        )
        try:
            dst = target_model(src, target, parallel, world_size)
        except KDScaleError:
            continue  # a shape this layout cannot hold
        if (
            dst.hidden_size % dst.num_attention_heads == 0
            and count_parameters(dst) <= search.params
        ):
            shapes.append(dst)
    if not shapes:
        raise KDScaleError(
            f"no candidate within prune.search.params={search.params} (source: "
            f"{count_parameters(src)}); raise it or prune.search.max_width_pruning / max_depth_pruning"
        )
    shapes.sort(key=count_parameters, reverse=True)
    return shapes[: search.top_k]


def _name(i: int, m: ModelConfig) -> str:
    return f"c{i}-L{m.num_layers}-h{m.hidden_size}-f{m.ffn_hidden_size}-a{m.num_attention_heads}"


def _distill(cfg: KDScaleConfig, dst: ModelConfig, model_dir: Path, run_dir: Path) -> float:
    """Distill one candidate for ``search.steps`` steps; return its held-out metric."""
    from kdscale.train import run as train

    search = cfg.prune.search
    train_cfg = cfg.train.model_copy(
        update={
            "init": str(model_dir),
            "out": str(run_dir),
            "steps": search.steps,
            "eval_every": search.steps,
        }
    )
    status = train(cfg.model_copy(update={"model": dst, "train": train_cfg}))
    if status:
        raise KDScaleError(f"distilling candidate {model_dir.parent.name} failed (status {status})")
    key = f"eval/{search.metric}"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [line[key] for line in lines if line.get(key) is not None]
    if not values:
        raise KDScaleError(f"{run_dir}: no {key} was logged (is there an eval split and a cache?)")
    return float(values[-1])


def run_search(cfg: KDScaleConfig) -> dict[str, Any]:
    """Score once, prune every candidate, distill each, rank; returns the report (collective)."""
    prune, search = cfg.prune, cfg.prune.search
    ckpt, src, world = prepare(cfg)
    shapes = candidate_shapes(src, search, cfg.parallel, world)
    if not (cfg.train.tokens or cfg.train.sources):
        raise KDScaleError(
            "prune.search distills each candidate: set train.tokens (and train.cache)"
        )
    cached = cfg.train.cache or (cfg.train.sources and all(s.cache for s in cfg.train.sources))
    if search.metric == "kl_teacher_tail" and not cached:
        raise KDScaleError(
            "prune.search.metric='kl_teacher_tail' needs train.cache (the teacher targets)"
        )
    samples = calibration_samples(prune, src.vocab_size)
    root = Path(prune.out)
    rows = []
    with parallel_session(cfg.parallel, seed=prune.seed):
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)  # prepare() refused it unless overwrite
        dist.barrier()
        scored = score_source(cfg, ckpt, src, samples)
        for i, dst in enumerate(shapes):
            model_dir = root / "candidates" / _name(i, dst) / "model"
            summary = write_pruned(cfg, scored, dst, model_dir)
            rows.append(
                {
                    "name": _name(i, dst),
                    "model": dst.model_dump(),
                    "params": count_parameters(dst),
                    "pruned_calibration_loss": summary["loss"]["pruned"],
                }
            )
    for row in rows:
        run_dir = root / "candidates" / row["name"] / "run"
        row[search.metric] = _distill(
            cfg,
            ModelConfig.model_validate(row["model"]),
            root / "candidates" / row["name"] / "model",
            run_dir,
        )
        log.info("candidate %s: %s %.4f", row["name"], search.metric, row[search.metric])
    winner = min(rows, key=lambda row: row[search.metric])
    report = {
        "source_params": count_parameters(src),
        "budget": search.params,
        "steps": search.steps,
        "metric": search.metric,
        "winner": winner["name"],
        "candidates": rows,
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        atomic_write_text(root / "search.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(root / "search.md", _table(report))
    log.info("search winner: %s (%s %.4f)", winner["name"], search.metric, winner[search.metric])
    return report


def _table(report: dict[str, Any]) -> str:
    metric = report["metric"]
    lines = [
        f"| candidate | params | loss after pruning | held-out {metric} after {report['steps']} steps |",
        "|---|---:|---:|---:|",
    ]
    for row in sorted(report["candidates"], key=lambda r: r[metric]):
        mark = " **(winner)**" if row["name"] == report["winner"] else ""
        lines.append(
            f"| {row['name']}{mark} | {row['params']:,} | {row['pruned_calibration_loss']:.4f} "
            f"| {row[metric]:.4f} |"
        )
    return "\n".join(lines) + "\n"
