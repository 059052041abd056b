"""``kdscale submit``: run a recipe (or one of its stages) as a SLURM batch job or a Ray job.

    kdscale submit recipe.yaml --launcher slurm --time 04:00:00   # `kdscale run recipe.yaml`
    kdscale submit recipe.yaml --launcher slurm --stage train --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 04:00:00 --account proj            # prints the SLURM job id
    kdscale submit recipe.yaml --launcher slurm --stage train --dry-run   # prints the script
    kdscale submit recipe.yaml --launcher ray --stage cache --address http://head:8265 --wait

The recipe is validated (with any ``--set``) before anything is rendered or submitted. SLURM jobs
are preemption-safe (``--requeue``, USR1 ``--signal-seconds`` before the time limit → SIGTERM to
the step, which checkpoints, then ``scontrol requeue``); a requeued job resumes. ``--env``
values never enter the job script (written 0600): SLURM gets them through ``sbatch``'s
environment, Ray through the job's ``env_vars``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from kdscale.errors import ArgumentParser, KDScaleError
from kdscale.launch import ray_jobs, slurm
from kdscale.stages import STAGE_COMMANDS

SUCCESS = {"slurm": "COMPLETED", "ray": "SUCCEEDED"}
LOG_TAIL = 40  # lines of a Ray job's log that --wait prints


def build_parser() -> argparse.ArgumentParser:
    """The ``kdscale submit`` flags."""
    p = ArgumentParser(prog="kdscale submit", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe YAML (validated before submission)")
    p.add_argument("--launcher", required=True, choices=["slurm", "ray"])
    p.add_argument("--stage", default="run", choices=["run", *STAGE_COMMANDS],
                   help="what the job runs: the whole recipe (`kdscale run`, default) or one stage")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config override passed to the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable). slurm: passed in "
                   "sbatch's environment (--export=ALL), never written into the job script, so "
                   "a secret such as WANDB_API_KEY=... stays out of files (SLURM keeps it with "
                   "the job); ray: sent as the job's env_vars through the Jobs API")
    p.add_argument("--python", help="python on the compute nodes (slurm: this one; ray: 'python')")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job; print its status (Ray: after the last lines of its log)")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits")
    s = p.add_argument_group("slurm")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0: no GPU request (CPU jobs)")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--partition")
    s.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--account")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit (checkpoint, requeue)")
    s.add_argument("--template", choices=slurm.TEMPLATES,
                   help="default: single (1 node), ray (cache stage), torchrun (other stages)")
    s.add_argument("--job-name")
    s.add_argument("--log-dir", default="runs/slurm", help="where the script and %%x-%%j.out logs go")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    r = p.add_argument_group("ray")
    r.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265")
    r.add_argument("--working-dir", help="uploaded as the job's directory (default: the recipe's)")
    return p


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise KDScaleError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env


# Per stage, the config keys naming directories the job reads or writes.
_STAGE_PATHS = {
    "run": ("recipe.out", "data.out"),
    "data": ("data.out",),
    "cache": ("cache.tokens", "cache.out"),
    "train": ("train.tokens", "train.cache", "train.out"),
    "prune": ("prune.model", "prune.tokens", "prune.out"),
}


def _relative_paths(cfg: Any, stage: str) -> list[str]:
    from kdscale.recipe.plan import value_at

    tree = cfg.model_dump()
    values = {dotted: value_at(tree, dotted) for dotted in _STAGE_PATHS[stage]}
    return [f"{k}={v}" for k, v in values.items() if v and not Path(v).is_absolute()]


def _validate_recipe(recipe: Path, args: argparse.Namespace) -> None:
    from kdscale.config import load_config

    cfg = load_config([str(recipe)], args.overrides)
    if args.stage == "run":
        from kdscale.recipe.plan import wire

        wire(cfg)  # the recipe's stages and paths fit together
        if args.launcher == "slurm" and args.nodes > 1:
            raise KDScaleError(
                "--nodes > 1 runs one stage on every node: pass --stage train (torchrun per node) "
                "or --stage cache (a Ray cluster over the nodes); run the rest with one node"
            )
    relative = _relative_paths(cfg, args.stage) if args.launcher == "ray" else []
    if relative:
        raise KDScaleError(
            f"{', '.join(relative)}: a Ray job runs in a temporary copy of its working directory, "
            "so relative outputs would be lost with it; use absolute paths on storage every "
            "node shares"
        )


def submit_slurm(args: argparse.Namespace, recipe: Path) -> int:
    """Render the batch script; print it (--dry-run) or submit it and print the job id."""
    template = args.template or ("single" if args.nodes == 1 else "ray" if args.stage == "cache" else "torchrun")
    log_dir = Path(args.log_dir).resolve()
    name = args.job_name or f"kdscale-{args.stage}-{recipe.stem}"
    env = _env(args.env)
    spec = slurm.SlurmSpec(
        job_name=name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
        account=args.account, signal_seconds=args.signal_seconds, workdir=str(Path.cwd()),
        output=str(log_dir / "%x-%j.out"), env=env, extra=tuple(args.sbatch),
    )
    command = slurm.job_command(str(recipe), args.stage, tuple(args.overrides), args.python or sys.executable)
    script = slurm.render_script(template, spec, command)
    if args.dry_run:
        print(script, end="")
        return 0
    slurm.check_nodes(args.nodes, args.partition)
    job_id = slurm.submit_script(script, log_dir / f"{name}.sbatch", env)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    status = slurm.wait_job(job_id, timeout=args.timeout)
    print(f"{status.state} exit_code={status.exit_code} signal={status.signal} reason={status.reason}")
    return 0 if status.state == SUCCESS["slurm"] else 1


def submit_ray(args: argparse.Namespace, recipe: Path) -> int:
    """Submit through Ray's Jobs API with the recipe's directory as working_dir; print the job id."""
    if not args.address:
        raise KDScaleError("--launcher ray needs --address (the Ray dashboard, e.g. http://head:8265)")
    working_dir = Path(args.working_dir).resolve() if args.working_dir else recipe.parent
    if not recipe.is_relative_to(working_dir):
        raise KDScaleError(f"recipe {str(recipe)!r} is not inside --working-dir {str(working_dir)!r}")
    command = slurm.job_command(
        str(recipe.relative_to(working_dir)), args.stage, tuple(args.overrides), args.python or "python"
    )
    env = _env(args.env)
    if args.dry_run:
        print(f"address: {args.address}\nworking_dir: {working_dir}\nenv: {env}\nentrypoint: {command.shell()}")
        return 0
    job_id = ray_jobs.submit_ray_job(args.address, command.shell(), working_dir, env)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    status = ray_jobs.wait_ray_job(args.address, job_id, timeout=args.timeout)
    print(ray_jobs.ray_job_logs(args.address, job_id, tail=LOG_TAIL), end="")
    print(f"{status} {ray_jobs.ray_job_message(args.address, job_id)}".rstrip())
    return 0 if status == SUCCESS["ray"] else 1


def main(argv: list[str]) -> int:
    """``kdscale submit`` entry point (user errors raise KDScaleError: one line, exit 2)."""
    args = build_parser().parse_args(argv)
    recipe = Path(args.recipe).resolve()
    _validate_recipe(recipe, args)
    if args.launcher == "slurm":
        return submit_slurm(args, recipe)
    return submit_ray(args, recipe)

