"""``kdscale run RECIPE.yaml``: run a recipe's stages in order, skipping what is already done.

    kdscale run configs/quickstart.yaml                 # data → teacher → prune → cache → ...
    kdscale run configs/quickstart.yaml --dry-run       # what would run, and where
    kdscale run recipe.yaml --set train.steps=2000 --force   # re-run train and what follows
    kdscale run recipe.yaml --verify                    # skip only outputs that still verify

Every stage writes its own directory under ``recipe.out`` and a record of its run in
``recipe.out/.kdscale-run/`` (``<stage>.yaml``: the config it ran with; ``<stage>.json``: its
digest and status). Running the same command again skips complete stages whose config and
inputs are unchanged, resumes a stage that stopped (a preempted cache or training run), and
refuses to replace an output made with another config unless ``--force`` is given. One
``kdscale run`` writes a recipe directory at a time (``recipe.out/.kdscale-run/.lock``).

Each stage is one W&B run (job type = stage) in one group per recipe directory; stage outputs
are logged as artifacts and every stage records the artifacts it read.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from kdscale.config import KDScaleConfig, load_config
from kdscale.errors import ArgumentParser
from kdscale.io import atomic_write_text, read_json
from kdscale.locks import exclusive_directory
from kdscale.logging import get_logger
from kdscale.recipe.layout import unused_pruned_model
from kdscale.recipe.lineage import stage_artifact
from kdscale.recipe.plan import (
    STATE_DIR,
    StagePlan,
    check_refusals,
    format_plan,
    plan_run,
    state_path,
    wire,
)
from kdscale.tracking import stage_tracking

log = get_logger(__name__)


def _group(cfg: KDScaleConfig) -> str:
    """The W&B group of this recipe directory: made once, kept by every later invocation."""
    if cfg.wandb.group:
        return cfg.wandb.group
    path = Path(cfg.recipe.out) / STATE_DIR / "group.json"
    if path.is_file():
        return str(read_json(path, "W&B group file")["group"])
    group = f"{cfg.recipe.name or 'recipe'}-{uuid.uuid4().hex[:8]}"
    atomic_write_text(path, json.dumps({"group": group}) + "\n")
    return group


def _record(cfg: KDScaleConfig, plan: StagePlan, status: str, **extra: Any) -> None:
    record = {"stage": plan.spec.name, "digest": plan.digest, "status": status,
              "output": str(plan.out), "decisive": plan.decisive, **extra}  # fmt: skip
    atomic_write_text(state_path(cfg, plan.spec.name), json.dumps(record, indent=1) + "\n")


def _stage_config_path(cfg: KDScaleConfig, stage: str) -> Path:
    return Path(cfg.recipe.out) / STATE_DIR / f"{stage}.yaml"


def run_stage(cfg: KDScaleConfig, plan: StagePlan) -> bool:
    """Run one stage in its own W&B run; True when its output is complete afterwards."""
    spec = plan.spec
    if plan.action == "redo" and plan.out.exists():
        log.info("%s: removing %s (%s)", spec.name, plan.out, plan.reason)
        shutil.rmtree(plan.out)
    stage_cfg = spec.configure(cfg)
    config = stage_cfg.model_dump(mode="json")
    config_file = _stage_config_path(cfg, spec.name)
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    _record(cfg, plan, "running")
    started = time.perf_counter()
    with stage_tracking(
        cfg.wandb, spec.name, plan.out, config | {"digest": plan.digest}, name=spec.name
    ) as tracker:
        for upstream in spec.depends:
            if upstream in cfg.recipe.stages:
                tracker.use_artifact(stage_artifact(cfg, upstream))
        spec.run(stage_cfg)
        complete = spec.complete(cfg)
        if complete:
            tracker.log_artifact(stage_artifact(cfg, spec.name))
    seconds = round(time.perf_counter() - started, 1)
    if complete:
        _record(cfg, plan, "complete", seconds=seconds)
    return complete


def run_recipe(
    cfg: KDScaleConfig, force: bool = False, dry_run: bool = False, verify: bool = False
) -> int:
    """Plan the recipe, print the plan, and (unless ``dry_run``) run it; exit status."""
    cfg = wire(cfg)
    unused = unused_pruned_model(cfg)
    if unused:
        log.warning("%s", unused)
    if dry_run:
        return _plan_and_run(cfg, force, verify, dry_run)
    with exclusive_directory(Path(cfg.recipe.out) / STATE_DIR, "recipe.out", "kdscale run"):
        return _plan_and_run(cfg, force, verify, dry_run)


def _plan_and_run(cfg: KDScaleConfig, force: bool, verify: bool, dry_run: bool) -> int:
    plans = plan_run(cfg, force=force, verify=verify)
    print(format_plan(plans), flush=True)
    check_refusals(plans)
    if dry_run:
        print(f"stage configs would be written to {Path(cfg.recipe.out) / STATE_DIR}/<stage>.yaml")
        return 0
    cfg = cfg.model_copy(update={"wandb": cfg.wandb.model_copy(update={"group": _group(cfg)})})
    for plan in plans:
        if plan.action == "skip":
            continue
        log.info("stage %s: %s → %s", plan.spec.name, plan.action, plan.out)
        if not run_stage(cfg, plan):
            print(f"stage {plan.spec.name} stopped before it finished; run the same command "
                  "again to continue", flush=True)  # fmt: skip
            return 0
    print(f"recipe {cfg.recipe.name or cfg.recipe.out}: all {len(plans)} stages complete",
          flush=True)  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    """``kdscale run RECIPE [--set K=V] [--force] [--dry-run] [--verify]``."""
    parser = ArgumentParser(prog="kdscale run", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="+", help="recipe YAML file(s); later files win")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="replace outputs made with another config")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run and where; run nothing")
    parser.add_argument("--verify", action="store_true",
                        help="skip a finished stage only if its output still verifies (shard "
                        "sha256s, checkpoint checksums); refuse a damaged one (--force: redo it)")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    return run_recipe(cfg, force=args.force, dry_run=args.dry_run, verify=args.verify)
