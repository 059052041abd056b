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
from kdscale.errors import KDScaleError
from kdscale.recipe.layout import (
    baseline_config,
    baseline_dir,
    export_dir,
    pruned_model_dir,
    report_dir,
    source_configs,
    student_config,
    teacher_dir,
)


@dataclass(frozen=True)
class StageSpec:
    """One recipe stage.

    ``decisive`` are the config keys (sections or dotted keys) whose values decide the output;
    keys tagged ``runtime`` in the schema (where it runs, how fast, what it logs) never do, and
    ``ignored`` names more keys under them that do not for this stage.
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
    verify: Callable[[KDScaleConfig], list[str]] = lambda cfg: []  # problems of a complete output


# --- running -------------------------------------------------------------------------------------


def _run_data(cfg: KDScaleConfig) -> None:
    from kdscale.data.stage import run

    for source in source_configs(cfg):
        run(source)  # resumes a stopped run; a redo has removed the old output


def _run_teacher(cfg: KDScaleConfig) -> None:
    from kdscale.models.hf_io import import_hf
    from kdscale.hub import resolve_model_dir

    teacher = cfg.cache.teacher  # a megatron teacher group loads the layout it runs at
    layout = (teacher.tensor_parallel, teacher.pipeline_parallel) if teacher.backend == "megatron" else (1, 1)
    import_hf(resolve_model_dir(cfg.recipe.teacher), teacher_dir(cfg), overwrite=True,
              tensor=layout[0], pipeline=layout[1])  # fmt: skip


def _run_prune(cfg: KDScaleConfig) -> None:
    from kdscale.prune.stage import run

    run(cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"overwrite": True})}))


def _run_cache(cfg: KDScaleConfig) -> None:
    from kdscale.cache.runner import run

    for source in source_configs(cfg):
        run(source)


def _run_train(cfg: KDScaleConfig) -> None:
    from kdscale.train import run

    status = run(cfg)
    if status:
        raise KDScaleError(f"training {cfg.train.out} failed with exit status {status}")


def _run_export(cfg: KDScaleConfig) -> None:
    from kdscale.models.hf_io import export_hf
    from kdscale.hub import resolve_model_dir

    tokenizer = resolve_model_dir(cfg.recipe.teacher) if cfg.recipe.teacher else None
    export_hf(cfg.train.out, export_dir(cfg), tokenizer=tokenizer, overwrite=True,
              verify=cfg.integrity.verify_checksums)  # fmt: skip


def _run_report(cfg: KDScaleConfig) -> None:
    from kdscale.recipe.report import write_report

    write_report(cfg)


# --- completeness ----------------------------------------------------------------------------------


def _tokens_complete(cfg: KDScaleConfig) -> bool:
    from kdscale.data.manifest import load_tokens_manifest

    try:
        for source in source_configs(cfg):
            load_tokens_manifest(source.data.out)  # refuses an incomplete token set
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

    for source in source_configs(cfg):
        try:
            cache = load_cache_manifest(source.cache.out)
            tokens = load_tokens_manifest(source.cache.tokens)
        except KDScaleError:
            return False
        wanted = {shard.name for split in tokens.splits.values() for shard in split.shards}
        if not wanted <= set(cache.shards):
            return False
    return True


def _run_complete(out: str | Path, steps: int) -> bool:
    from kdscale.models.checkpoints import latest_checkpoint, read_train_state

    try:
        ckpt = latest_checkpoint(out)
        return ckpt is not None and read_train_state(ckpt)["step"] >= steps
    except KDScaleError:
        return False  # a damaged pointer or state: not complete (the stage resumes or refuses)


# --- verification (`kdscale run --verify`): is a complete output still what was written? ------------


def _verify_tokens(cfg: KDScaleConfig) -> list[str]:
    from kdscale.data.manifest import load_tokens_manifest
    from kdscale.data.shards import shard_problems

    problems = []
    for source in source_configs(cfg):  # one token set per recipe.sources entry (or just one)
        try:
            manifest = load_tokens_manifest(source.data.out)
        except KDScaleError as exc:
            problems.append(str(exc))
            continue
        shards = [s for split in manifest.splits.values() for s in split.shards]
        problems += shard_problems(source.data.out, shards, "token shard")
    return problems


def _verify_cache(cfg: KDScaleConfig) -> list[str]:
    from kdscale.cache.manifest import load_cache_manifest
    from kdscale.data.shards import shard_problems

    problems = []
    for source in source_configs(cfg):
        try:
            manifest = load_cache_manifest(source.cache.out)
        except KDScaleError as exc:
            problems.append(str(exc))
            continue
        problems += shard_problems(source.cache.out, list(manifest.shards.values()), "cache shard")
    return problems


def _verify_directory(path: Callable[[KDScaleConfig], Path]) -> Callable[[KDScaleConfig], list[str]]:
    """Problems of a directory against its checksums.json (a model directory, an HF export)."""

    def verify(cfg: KDScaleConfig) -> list[str]:
        from kdscale.integrity import verify_checksums

        try:
            return verify_checksums(path(cfg))
        except KDScaleError as exc:
            return [str(exc)]

    return verify


def _latest(out: Callable[[KDScaleConfig], str | Path]) -> Callable[[KDScaleConfig], Path]:
    def latest(cfg: KDScaleConfig) -> Path:
        from kdscale.models.checkpoints import latest_checkpoint

        found = latest_checkpoint(out(cfg))
        if found is None:
            raise KDScaleError(f"{out(cfg)}: no checkpoint")
        return found

    return latest


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "data", "tokens", (), ("data",), (),
            lambda cfg: cfg.data.out, _run_data, _tokens_complete, verify=_verify_tokens,
        ),
        StageSpec(
            "teacher", "teacher", (), ("recipe.teacher",), (),
            lambda cfg: str(teacher_dir(cfg)), _run_teacher,
            lambda cfg: _model_dir_complete(teacher_dir(cfg)),
            verify=_verify_directory(teacher_dir),
        ),
        StageSpec(
            "cache", "cache", ("data",), ("cache",), (),
            lambda cfg: cfg.cache.out, _run_cache, _cache_complete, verify=_verify_cache,
        ),
        StageSpec(
            "prune", "pruned", ("teacher", "data", "cache"), ("prune",), (),
            lambda cfg: cfg.prune.out, _run_prune, _pruned_complete,
            verify=_verify_directory(pruned_model_dir),
        ),
        StageSpec(
            "train", "student", ("data", "cache", "prune"), ("model", "loss", "train"), (),
            lambda cfg: cfg.train.out, _run_train,
            lambda cfg: _run_complete(cfg.train.out, cfg.train.steps), student_config,
            verify=_verify_directory(_latest(lambda cfg: cfg.train.out)),
        ),
        StageSpec(
            "baseline", "baseline", ("data", "prune"), ("model", "train"),
            ("train.cache", "train.sources.*.cache"),
            lambda cfg: str(baseline_dir(cfg)), _run_train,
            lambda cfg: _run_complete(baseline_dir(cfg), cfg.train.steps), baseline_config,
            verify=_verify_directory(_latest(baseline_dir)),
        ),
        StageSpec(
            "export", "hf", ("train",), (), (),
            lambda cfg: str(export_dir(cfg)), _run_export,
            lambda cfg: (export_dir(cfg) / "model.safetensors").is_file(),
            verify=_verify_directory(export_dir),
        ),
        StageSpec(
            "report", "report", ("data", "teacher", "cache", "prune", "train", "baseline"), (), (),
            lambda cfg: str(report_dir(cfg)), _run_report,
            lambda cfg: (report_dir(cfg) / "report.json").is_file(),
        ),
    )
}  # fmt: skip
