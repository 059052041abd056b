"""Plan a recipe run: wire each stage's inputs to the outputs before it, fingerprint what decides
each output, and decide per stage whether to skip, run, resume or (with ``--force``) redo it.

    cfg = wire(load_config(["recipe.yaml"]))
    plan = plan_run(cfg, force=False, verify=False)
    check_refusals(plan)                  # before anything runs
    print(format_plan(plan))

A stage's digest hashes its decisive config plus the digests of the stages it reads, so a change
re-runs that stage and every stage after it that depends on it. With ``verify`` a complete
stage is skipped only if its output still verifies (shard sha256s against the manifests,
checkpoints and exports against their ``checksums.json``); a damaged one is refused, naming
the damage, and redone with ``force``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdscale.config import KDScaleConfig
from kdscale.config.base import runtime_keys
from kdscale.config.model import checkpoint_fields
from kdscale.errors import KDScaleError
from kdscale.io import read_json
from kdscale.recipe.stages import STAGES, StageSpec

STATE_DIR = ".kdscale-run"


@dataclass
class StagePlan:
    """What the run does with one stage."""

    spec: StageSpec
    out: Path
    digest: str
    decisive: dict[str, Any]
    action: str  # skip | run | resume | redo | refuse
    reason: str


def _check_paths(cfg: KDScaleConfig) -> None:
    recipe = cfg.recipe
    if not recipe.out:
        raise KDScaleError("recipe.out is empty: set the directory the recipe's stages write into")
    stages = set(recipe.stages)
    if "teacher" in stages and not recipe.teacher:
        raise KDScaleError("recipe.stages has 'teacher': set recipe.teacher (HF dir or fixture name)")
    if "prune" in stages and "teacher" not in stages and not cfg.prune.model:
        raise KDScaleError("recipe.stages has 'prune' without 'teacher': set prune.model")
    if recipe.sources and (cfg.data.inputs or cfg.data.eval_inputs):
        raise KDScaleError(
            "recipe.sources names every source's inputs: leave data.inputs and data.eval_inputs empty"
        )
    if recipe.sources and (cfg.train.tokens or cfg.train.cache):
        raise KDScaleError(
            "recipe.sources wires train.sources: leave train.tokens and train.cache empty"
        )
    needs_tokens = stages & {"prune", "cache", "train", "baseline"}
    if needs_tokens and "data" not in stages and not cfg.data.out:
        raise KDScaleError(
            f"recipe.stages has {', '.join(sorted(needs_tokens))} without 'data': set data.out "
            "to an existing token directory"
        )
    if stages & {"export", "report"} and "train" not in stages and not cfg.train.out:
        raise KDScaleError("recipe.stages exports or reports without 'train': set train.out")
    if stages & {"export", "report"} and cfg.train.engine == "deepspeed":
        raise KDScaleError(
            "recipe.stages 'export' and 'report' read megatron checkpoints: with "
            "train.engine=deepspeed the student is exported by training itself to "
            "<train.out>/hf (train.deepspeed.export_hf); drop those stages"
        )


def _check_training(cfg: KDScaleConfig) -> None:
    """What can be checked of the training stages without their inputs: the batch split over
    the local ranks, and the loss against the kind of targets the cache will hold."""
    from kdscale.losses.checks import check_target_kind
    from kdscale.train import check_batch

    ranks, parallel = cfg.train.nproc_per_node, cfg.parallel
    if ranks % (parallel.tensor * parallel.pipeline) == 0:
        check_batch(cfg, ranks // (parallel.tensor * parallel.pipeline))
    if "cache" in cfg.recipe.stages:
        check_target_kind(cfg.cache.codec.kind, cfg.loss)


def wire(cfg: KDScaleConfig) -> KDScaleConfig:
    """Fill every stage input and output left unset from ``recipe.out`` and the stages before it
    (a value set in the recipe wins), and put every stage's W&B run in one directory."""
    _check_paths(cfg)
    recipe, root = cfg.recipe, Path(cfg.recipe.out)
    stages = set(recipe.stages)
    tree = cfg.model_dump()

    def fill(dotted: str, value: Any, when: bool = True) -> None:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        if when and node[leaf] in ("", None):
            node[leaf] = value

    def default(section: Any, field: str) -> bool:
        return field not in section.model_fields_set

    data_out = cfg.data.out or str(root / "tokens")
    fill("data.out", data_out)
    if recipe.teacher and default(cfg.data, "tokenizer"):
        tree["data"]["tokenizer"] = recipe.teacher
    fill("prune.model", str(root / "teacher"), "teacher" in stages)
    first_tokens = str(Path(data_out) / recipe.sources[0].name) if recipe.sources else data_out
    fill("prune.tokens", first_tokens)  # calibration on the first source
    fill("prune.out", str(root / "pruned"))
    fill("cache.tokens", data_out)
    fill("cache.out", str(root / "cache"))
    if recipe.teacher and default(cfg.cache.teacher, "model"):  # megatron: the teacher stage's import
        imported = cfg.cache.teacher.backend == "megatron" and "teacher" in stages
        tree["cache"]["teacher"]["model"] = str(root / "teacher") if imported else recipe.teacher
    if recipe.sources and not cfg.train.sources:
        cache_out = tree["cache"]["out"]
        tree["train"]["sources"] = [
            {"name": s.name, "tokens": str(Path(data_out) / s.name), "weight": s.weight,
             "cache": str(Path(cache_out) / s.name) if "cache" in stages else None}
            for s in recipe.sources
        ]  # fmt: skip
    fill("train.tokens", data_out, not recipe.sources)
    fill("train.cache", tree["cache"]["out"], "cache" in stages and not recipe.sources)
    if cfg.train.engine == "deepspeed":  # the engine starts from train.deepspeed.model
        fill("train.deepspeed.model", tree["prune"]["out"], "prune" in stages)
    else:
        fill("train.init", tree["prune"]["out"], "prune" in stages)
    fill("train.out", str(root / "student"))
    fill("wandb.dir", str(root))
    wired = KDScaleConfig.model_validate(tree)
    if stages & {"train", "baseline"}:
        _check_training(wired)
    return wired


def value_at(tree: dict[str, Any], dotted: str) -> Any:
    """The value of a dotted key (``train.out``) in a config dumped to a dict."""
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _drop(tree: Any, dotted: str) -> None:
    """Remove a dotted key; ``*`` stands for every item of a list (``train.sources.*.cache``)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        if isinstance(tree, dict):
            tree.pop(head, None)
        return
    if head == "*":
        children = tree if isinstance(tree, list) else []
    else:
        children = [tree[head]] if isinstance(tree, dict) and head in tree else []
    for child in children:
        _drop(child, rest)


def decisive_config(spec: StageSpec, cfg: KDScaleConfig) -> dict[str, Any]:
    """The config values that decide ``spec``'s output, as nested plain data."""
    tree = cfg.model_dump(mode="json")
    decisive = list(spec.decisive)
    if spec.name == "prune" and cfg.prune.search.enabled:  # candidates are distilled as trained
        decisive.append("train")
    ignored = list(runtime_keys(KDScaleConfig, "")) + list(spec.ignored)
    if spec.name in ("train", "baseline") and "prune" in cfg.recipe.stages:
        ignored += [f"model.{f}" for f in checkpoint_fields()]  # the pruned model decides them
    for dotted in ignored:
        _drop(tree, dotted)
    values = {key: value_at(tree, key) for key in decisive}
    if cfg.recipe.sources and spec.name in ("data", "cache"):  # weights decide training only
        values["recipe.sources"] = [
            {k: v for k, v in s.items() if k != "weight"} for s in tree["recipe"]["sources"]
        ]
    return values


def _digest(decisive: dict[str, Any], upstream: list[str]) -> str:
    payload = json.dumps({"config": decisive, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def state_path(cfg: KDScaleConfig, stage: str) -> Path:
    """The record of a stage's last run: its digest, status and decisive config."""
    return Path(cfg.recipe.out) / STATE_DIR / f"{stage}.json"


def read_state(cfg: KDScaleConfig, stage: str) -> dict[str, Any] | None:
    """The stage's record, or None when it never started in this recipe directory."""
    path = state_path(cfg, stage)
    state = read_json(path, "stage record") if path.is_file() else None
    if state is not None and not (isinstance(state, dict) and {"digest", "status", "decisive"} <= set(state)):
        raise KDScaleError(f"stage record {path} is damaged; delete it to plan {stage} afresh")
    return state


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _decide(
    spec: StageSpec, cfg: KDScaleConfig, digest: str, decisive: dict[str, Any], rerun: bool,
    force: bool, verify: bool,
) -> tuple[str, str]:
    out = Path(spec.output(cfg))
    state = read_state(cfg, spec.name)
    same = state is not None and state["digest"] == digest
    if not out.exists():
        return "run", "no output yet"
    if same and state["status"] == "complete" and spec.complete(cfg):
        problems = spec.verify(cfg) if verify else []
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            return ("redo" if force else "refuse"), f"damaged since it completed: {problems[0]}{more}"
        return "skip", "complete, config unchanged" + (", verified" if verify else "")
    if same:
        return "resume", "started with this config; continues"
    if state is None:
        why = f"{out} exists but was not written by this recipe"
    elif rerun and state["decisive"] == decisive:
        why = "an input stage changed"
    else:
        changed = _changed_keys(state["decisive"], decisive) or ["an input stage"]
        why = f"changed: {', '.join(changed[:6])}{' …' if len(changed) > 6 else ''}"
    return ("redo" if force else "refuse"), why


def plan_run(cfg: KDScaleConfig, force: bool = False, verify: bool = False) -> list[StagePlan]:
    """Decide every stage's action: skip, run, resume, redo (``force``) or refuse; ``verify``
    checks the output of every stage it would skip."""
    plans: list[StagePlan] = []
    digests: dict[str, str] = {}
    redone: set[str] = set()
    for name in cfg.recipe.stages:
        spec = STAGES[name]
        upstream = [d for d in spec.depends if d in digests]
        decisive = decisive_config(spec, cfg)
        digest = _digest(decisive, [digests[d] for d in upstream])
        rerun = any(d in redone for d in upstream)
        action, reason = _decide(spec, cfg, digest, decisive, rerun, force, verify)
        if action in ("run", "redo"):
            redone.add(name)
        digests[name] = digest
        plans.append(StagePlan(spec, Path(spec.output(cfg)), digest, decisive, action, reason))
    return plans


def check_refusals(plans: list[StagePlan]) -> None:
    """Raise, naming every stage that would replace an output made with another config."""
    refused = [p for p in plans if p.action == "refuse"]
    damaged = [p for p in refused if p.reason.startswith("damaged")]
    if damaged:
        first = damaged[0]
        raise KDScaleError(
            f"{first.spec.name} ({first.out}) is {first.reason}: pass --force to make it again "
            "(and what reads it), or restore it"
        )
    if refused:
        names = ", ".join(f"{p.spec.name} ({p.out})" for p in refused)
        raise KDScaleError(
            f"re-running {names} would replace outputs made with another config: pass --force "
            "to replace them, or set recipe.out to a new directory"
        )


def format_plan(plans: list[StagePlan]) -> str:
    """One line per stage: action, stage, output directory, why."""
    width = max(len(p.spec.name) for p in plans)
    lines = [f"{p.action:<6}  {p.spec.name:<{width}}  {p.out}  ({p.reason})" for p in plans]
    return "\n".join(lines)
