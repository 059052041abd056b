"""The stages ``kdscale run`` chains: what each reads and writes, what decides its output, how
to run it and how to tell that its output is complete.

Each stage runs in this process through the same function as its own subcommand (``kdscale
data``, ``cache``, ``prune``, ``train``) or command (``import-hf``, ``export-hf``), so a recipe
stage and the command behave the same; ``report`` exists only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdscale.config import KDScaleConfig
from kdscale.config.model import ARCHITECTURE_FIELDS
from kdscale.errors import KDScaleError


@dataclass(frozen=True)
class StageSpec:
    """One recipe stage.

    ``decisive`` are the config keys (sections or dotted keys) whose values decide the output;
    ``ignored`` are keys under them that do not (where it runs, how fast, what it logs).
    """

    name: str
    subdir: str
    depends: tuple[str, ...]
    decisive: tuple[str, ...]
    ignored: tuple[str, ...]
    output: Callable[[KDScaleConfig], str]
    run: Callable[[KDScaleConfig], None]
    complete: Callable[[KDScaleConfig], bool]
    configure: Callable[[KDScaleConfig], KDScaleConfig] = lambda cfg: cfg  # the config it runs



# --- running -------------------------------------------------------------------------------------


def _run_data(cfg: KDScaleConfig) -> None:
    from kdscale.data.stage import run

    run(cfg.model_copy(update={"data": cfg.data.model_copy(update={"overwrite": True})}))


def _run_teacher(cfg: KDScaleConfig) -> None:
    from kdscale.models.hf_io import import_hf
    from kdscale.teacher.fixture import resolve_model_dir

    import_hf(resolve_model_dir(cfg.recipe.teacher), teacher_dir(cfg), overwrite=True)


def _run_prune(cfg: KDScaleConfig) -> None:
    from kdscale.prune.stage import run

    run(cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"overwrite": True})}))


def _run_cache(cfg: KDScaleConfig) -> None:
    from kdscale.cache.runner import run

    run(cfg)


def _run_train(cfg: KDScaleConfig) -> None:
    from kdscale.train.stage import run

    status = run(cfg)
    if status:
        raise KDScaleError(f"training {cfg.train.out} failed with exit status {status}")


def _run_export(cfg: KDScaleConfig) -> None:
    from kdscale.models.hf_io import export_hf
    from kdscale.teacher.fixture import resolve_model_dir

    tokenizer = resolve_model_dir(cfg.recipe.teacher) if cfg.recipe.teacher else None
    export_hf(cfg.train.out, export_dir(cfg), tokenizer=tokenizer, overwrite=True)


def _run_report(cfg: KDScaleConfig) -> None:
    from kdscale.recipe.report import write_report

    write_report(cfg)


# --- outputs -------------------------------------------------------------------------------------


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
    import json

    search = out / "search.json"
    if not search.is_file():
        raise KDScaleError(f"{search} is missing: the prune search has not finished")
    return out / "candidates" / json.loads(search.read_text())["winner"] / "model"


def student_config(cfg: KDScaleConfig) -> KDScaleConfig:
    """``cfg`` with the student starting from the pruned model, and its architecture, when the
    recipe prunes (numerics such as precision and the layer spec stay as configured)."""
    if "prune" not in cfg.recipe.stages or cfg.train.init != cfg.prune.out:
        return cfg  # (the deepspeed engine takes its architecture from train.deepspeed.model)
    from kdscale.train.checkpoint import read_model_config

    init = pruned_model_dir(cfg)
    pruned = read_model_config(init)
    arch = pruned.model_dump(include=set(ARCHITECTURE_FIELDS) | {"max_position_embeddings",
                                                                  "rotary_base", "norm_epsilon"})
    train = cfg.train.model_copy(update={"init": str(init)})
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=arch), "train": train})


def baseline_config(cfg: KDScaleConfig) -> KDScaleConfig:
    """The student's run without teacher targets: same init, data, steps and schedule."""
    train = cfg.train.model_copy(update={"cache": None, "out": str(baseline_dir(cfg))})
    return student_config(cfg.model_copy(update={"train": train}))


# --- completeness ----------------------------------------------------------------------------------


def _tokens_complete(cfg: KDScaleConfig) -> bool:
    from kdscale.data.manifest import load_tokens_manifest

    try:
        load_tokens_manifest(cfg.data.out)
    except KDScaleError:
        return False
    return True


def _model_dir_complete(path: Path) -> bool:
    return (path / "train_state.json").is_file()  # model directories appear atomically


def _pruned_complete(cfg: KDScaleConfig) -> bool:
    try:
        return _model_dir_complete(pruned_model_dir(cfg))
    except KDScaleError:
        return False


def _cache_complete(cfg: KDScaleConfig) -> bool:
    from kdscale.cache.manifest import load_cache_manifest
    from kdscale.data.manifest import load_tokens_manifest

    try:
        cache = load_cache_manifest(cfg.cache.out)
        tokens = load_tokens_manifest(cfg.cache.tokens)
    except KDScaleError:
        return False
    wanted = {shard.name for split in tokens.splits.values() for shard in split.shards}
    return wanted <= set(cache.shards)


def _run_complete(out: str | Path, steps: int) -> bool:
    from kdscale.train.checkpoint import latest_checkpoint, read_train_state

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return False

    return read_train_state(ckpt)["step"] >= steps


# Train keys that change where, how fast or how often a run saves, logs or evaluates, never the
# weights it ends with (a run may stop and resume with other values).
_RUNTIME_ONLY = tuple(
    f"train.{key}"
    for key in ("resume", "nproc_per_node", "prefetch_steps", "log_every", "peak_flops",
                "exit_interval", "save_every", "keep_checkpoints", "eval_every", "eval_batches")
)  # fmt: skip

STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "data", "tokens", (), ("data",), ("data.overwrite",),
            lambda cfg: cfg.data.out, _run_data, _tokens_complete,
        ),
        StageSpec(
            "teacher", "teacher", (), ("recipe.teacher",), (),
            lambda cfg: str(teacher_dir(cfg)), _run_teacher,
            lambda cfg: _model_dir_complete(teacher_dir(cfg)),
        ),
        StageSpec(
            "cache", "cache", ("data",), ("cache",), ("cache.ray", "cache.restart"),
            lambda cfg: cfg.cache.out, _run_cache, _cache_complete,
        ),
        StageSpec(
            "prune", "pruned", ("teacher", "data", "cache"), ("prune",), ("prune.overwrite",),
            lambda cfg: cfg.prune.out, _run_prune, _pruned_complete,
        ),
        StageSpec(
            "train", "student", ("data", "cache", "prune"), ("model", "loss", "train"),
            _RUNTIME_ONLY,
            lambda cfg: cfg.train.out, _run_train,
            lambda cfg: _run_complete(cfg.train.out, cfg.train.steps), student_config,
        ),
        StageSpec(
            "baseline", "baseline", ("data", "prune"), ("model", "train"),
            (*_RUNTIME_ONLY, "train.cache"),
            lambda cfg: str(baseline_dir(cfg)), _run_train,
            lambda cfg: _run_complete(baseline_dir(cfg), cfg.train.steps), baseline_config,
        ),
        StageSpec(
            "export", "hf", ("train",), (), (),
            lambda cfg: str(export_dir(cfg)), _run_export,
            lambda cfg: (export_dir(cfg) / "model.safetensors").is_file(),
        ),
        StageSpec(
            "report", "report", ("data", "teacher", "cache", "prune", "train", "baseline"), (), (),
            lambda cfg: str(report_dir(cfg)), _run_report,
            lambda cfg: (report_dir(cfg) / "report.json").is_file(),
        ),
    )
}  # fmt: skip
