"""Where a recipe's stages write under ``recipe.out``, and the student configs derived from them.

Shared by the stage table (:mod:`kdscale.recipe.stages`) and the report
(:mod:`kdscale.recipe.report`).
"""

from __future__ import annotations

from pathlib import Path

from kdscale.config import KDScaleConfig
from kdscale.config.model import checkpoint_fields
from kdscale.errors import KDScaleError
from kdscale.io import read_json


def _root(cfg: KDScaleConfig) -> Path:
    return Path(cfg.recipe.out)


def teacher_dir(cfg: KDScaleConfig) -> Path:
    """Where the ``teacher`` stage writes the imported teacher (a kdscale model directory)."""
    return _root(cfg) / "teacher"


def baseline_dir(cfg: KDScaleConfig) -> Path:
    """Where the ``baseline`` stage trains the LM-loss-only student."""
    return _root(cfg) / "baseline"


def export_dir(cfg: KDScaleConfig) -> Path:
    """Where the ``export`` stage writes the student as an HF directory."""
    return _root(cfg) / "hf"


def report_dir(cfg: KDScaleConfig) -> Path:
    """Where the ``report`` stage writes report.json, report.md and curves.png."""
    return _root(cfg) / "report"


def pruned_model_dir(cfg: KDScaleConfig) -> Path:
    """The model the ``prune`` stage made: ``prune.out``, or with ``prune.search`` the winner's
    ``prune.out/candidates/<winner>/model``."""
    out = Path(cfg.prune.out)
    if not cfg.prune.search.enabled:
        return out
    search = out / "search.json"
    if not search.is_file():
        raise KDScaleError(f"{search} is missing: the prune search has not finished")
    body = read_json(search, "prune search result")
    winner = body.get("winner") if isinstance(body, dict) else None
    if not isinstance(winner, str) or Path(winner).name != winner or winner in ("", ".", ".."):
        raise KDScaleError(f"{search} is damaged: 'winner' is not a candidate name")
    return out / "candidates" / winner / "model"


def student_config(cfg: KDScaleConfig) -> KDScaleConfig:
    """``cfg`` with the student starting from the pruned model, and its architecture, when the
    recipe prunes (numerics such as precision and the layer spec stay as configured)."""
    if "prune" not in cfg.recipe.stages or cfg.train.init != cfg.prune.out:
        return cfg  # (the deepspeed engine takes its architecture from train.deepspeed.model)
    from kdscale.models.checkpoints import read_model_config

    init = pruned_model_dir(cfg)
    pruned = read_model_config(init).model_dump(include=set(checkpoint_fields()))
    train = cfg.train.model_copy(update={"init": str(init)})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=pruned), "train": train})


def source_configs(cfg: KDScaleConfig) -> list[KDScaleConfig]:
    """The config of each data input's own ``data`` and ``cache`` runs: the recipe's own config
    for one input; per ``recipe.sources`` entry, its inputs into ``data.out/<name>`` and its
    cache into ``cache.out/<name>``."""
    configs = []
    for source in cfg.recipe.sources:
        tokens = str(Path(cfg.data.out) / source.name)
        data = cfg.data.model_copy(
            update={"inputs": source.inputs, "eval_inputs": source.eval_inputs, "out": tokens}
        )
        cache = cfg.cache.model_copy(update={"tokens": tokens, "out": str(Path(cfg.cache.out) / source.name)})
        configs.append(cfg.model_copy(update={"data": data, "cache": cache}))
    return configs or [cfg]


def baseline_config(cfg: KDScaleConfig) -> KDScaleConfig:
    """The student's run without teacher targets: same init, data, steps and schedule."""
    sources = [s.model_copy(update={"cache": None}) for s in cfg.train.sources]
    train = cfg.train.model_copy(
        update={"cache": None, "sources": sources, "out": str(baseline_dir(cfg))}
    )
    return student_config(cfg.model_copy(update={"train": train}))


def unused_pruned_model(cfg: KDScaleConfig) -> str | None:
    """A warning when a recipe trains a student that does not start from the pruned model it
    makes or already has (a wired recipe; None when there is nothing to say)."""
    if not {"train", "baseline"} & set(cfg.recipe.stages):
        return None
    key = "train.deepspeed.model" if cfg.train.engine == "deepspeed" else "train.init"
    start = cfg.train.deepspeed.model if cfg.train.engine == "deepspeed" else cfg.train.init
    if "prune" in cfg.recipe.stages:
        pruned = Path(cfg.prune.out)
    else:
        try:
            pruned = pruned_model_dir(cfg)
        except KDScaleError:  # a search that has not finished: no model yet
            return None
        if not (pruned / "train_state.json").is_file():
            return None
    pruned_paths = {pruned.resolve(), Path(cfg.prune.out).resolve()}
    if start is not None and Path(start).resolve() in pruned_paths:
        return None
    starts = f"starts from {start}" if start else "starts from a random init"
    return (
        f"a pruned model exists at {pruned}, but the student {starts} ({key}); set "
        f"{key}={pruned} to distill the pruned model"
    )
