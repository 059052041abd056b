"""The ``kdscale`` console entry point: one subcommand per pipeline stage.

Every subcommand takes ``--config FILE`` (repeatable) and ``--set a.b=c`` (repeatable); a few
shorthand flags set the most common keys of its section. Bad input exits with status 2 and a
one-line message. Any other failure is also one line (a full disk, an unwritable path, a dead
Ray actor; otherwise "internal error", exit status 1) naming the file that holds its traceback.
Stage modules are imported only when their subcommand runs, so ``--help`` stays fast.

    kdscale data --input stdlib:python --tokenizer smollm2-135m --seq-len 512 --out runs/tokens
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdscale import __version__
from kdscale.errors import ArgumentParser, KDScaleError, describe_failure


@dataclass(frozen=True)
class Shorthand:
    """A flag that sets one config key (``--seq-len 512`` ≡ ``--set data.seq_len=512``)."""

    flag: str
    key: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A subcommand: its help line, the ``module:function`` it runs, and its shorthand flags."""

    help: str
    target: str
    shorthands: tuple[Shorthand, ...] = ()


# One row per `kdscale <stage>` command (kdscale.stages.STAGE_COMMANDS, in that order).
STAGES: dict[str, Stage] = {
    "data": Stage(
        "Tokenize and pack text into token shards (webdataset tars + tokens manifest).",
        "kdscale.data.stage:run",
        (
            Shorthand("--input", "data.inputs", "input path or built-in corpus (repeatable)",
                      {"action": "append"}),
            Shorthand("--eval-input", "data.eval_inputs", "held-out input (repeatable)",
                      {"action": "append"}),
            Shorthand("--eval-fraction", "data.eval_fraction", "fraction of documents held out",
                      {"type": float}),
            Shorthand("--tokenizer", "data.tokenizer", "HF tokenizer dir or fixture name"),
            Shorthand("--seq-len", "data.seq_len", "tokens per sample", {"type": int}),
            Shorthand("--shard-samples", "data.shard_samples", "samples per shard", {"type": int}),
            Shorthand("--text-field", "data.text_field", "jsonl/parquet text field"),
            Shorthand("--workers", "data.workers", "tokenizer processes", {"type": int}),
            Shorthand("--out", "data.out", "output directory"),
            Shorthand("--overwrite", "data.overwrite", "replace an existing output",
                      {"action": "store_true", "default": None}),
        ),
    ),
    "cache": Stage(
        "Run the teacher over token shards on a Ray actor pool; write sparse-target cache shards.",
        "kdscale.cache.runner:run",
        (
            Shorthand("--tokens", "cache.tokens", "token-shard directory"),
            Shorthand("--out", "cache.out", "cache directory (resumed if it exists)"),
            Shorthand("--teacher", "cache.teacher.model", "teacher HF dir or fixture name"),
            Shorthand("--kind", "cache.codec.kind", "topk | topp | sampled"),
            Shorthand("--ray-address", "cache.ray.address", "attach to a running Ray cluster"),
            Shorthand("--actors", "cache.ray.actors", "teacher actors", {"type": int}),
            Shorthand("--restart", "cache.restart", "discard a cache made differently",
                      {"action": "store_true", "default": None}),
        ),
    ),
    "prune": Stage(
        "Score heads, groups, neurons, channels and layers on calibration tokens; write a pruned model.",
        "kdscale.prune.stage:run",
        (
            Shorthand("--model", "prune.model", "source model dir, HF dir or fixture name"),
            Shorthand("--tokens", "prune.tokens", "calibration token-shard directory"),
            Shorthand("--out", "prune.out", "pruned model directory"),
            Shorthand("--samples", "prune.calibration_samples", "calibration samples",
                      {"type": int}),
            Shorthand("--layers", "prune.target.num_layers", "target layers", {"type": int}),
            Shorthand("--hidden", "prune.target.hidden_size", "target hidden size", {"type": int}),
            Shorthand("--ffn", "prune.target.ffn_hidden_size", "target MLP width", {"type": int}),
            Shorthand("--heads", "prune.target.num_attention_heads", "target query heads",
                      {"type": int}),
            Shorthand("--groups", "prune.target.num_query_groups", "target KV groups",
                      {"type": int}),
            Shorthand("--search", "prune.search.enabled", "search shapes by short distillation",
                      {"action": "store_true", "default": None}),
            Shorthand("--overwrite", "prune.overwrite", "replace an existing output",
                      {"action": "store_true", "default": None}),
        ),
    ),
    "train": Stage(
        "Train the student on token shards with cached-target KD: megatron-core (TP×PP×DP) or, "
        "with train.engine=deepspeed, an HF model under DeepSpeed ZeRO.",
        "kdscale.train.stage:run",
        (
            Shorthand("--tokens", "train.tokens", "token-shard directory"),
            Shorthand("--cache", "train.cache", "teacher-target cache (omit: LM loss only)"),
            Shorthand("--out", "train.out", "run directory (resumed if it has checkpoints)"),
            Shorthand("--steps", "train.steps", "optimizer steps of the run", {"type": int}),
        ),
    ),
}

# Commands that inspect or convert an artifact rather than run a configured stage:
# name -> (help, "module:function" taking argv).
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("Run a recipe's stages in order (data, teacher, cache, prune, train, baseline, export, "
            "report); skips finished ones, --dry-run prints the plan.",
            "kdscale.recipe.runner:main"),
    "inspect-cache": ("Summarize a cache (codec, bytes/token, fidelity); --verify checks every sha256.",
                      "kdscale.cache.inspect:main"),
    "eval": ("Evaluate a checkpoint: LM loss, perplexity and (with --cache) KL to the teacher.",
             "kdscale.train.eval_command:main"),
    "import-hf": ("Convert an HF Llama directory into a kdscale model directory (dist checkpoint).",
                  "kdscale.models.hf_io:import_main"),
    "export-hf": ("Write a kdscale model directory as an HF Llama directory (safetensors + tokenizer).",
                  "kdscale.models.hf_io:export_main"),
    "submit": ("Submit a recipe's stage as a SLURM batch job or a Ray job (--dry-run prints it).",
               "kdscale.launch.submit:main"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: global options plus one subparser per stage."""
    parser = ArgumentParser(
        prog="kdscale",
        description="Distributed pretraining distillation: data → teacher cache → student.",
    )
    parser.add_argument("--version", action="version", version=f"kdscale {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.help)
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="YAML config file (repeatable; later files win)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override one config key, e.g. data.seq_len=512 (repeatable)")
        for short in stage.shorthands:
            p.add_argument(short.flag, dest=short.key, help=f"{short.help} [{short.key}]",
                           **short.kwargs)
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _shorthand_base(args: argparse.Namespace, stage: Stage) -> list[str]:
    """Turn shorthand flags into ``--set`` strings (applied before explicit ``--set``)."""
    import json

    sets = []
    for short in stage.shorthands:
        value = getattr(args, short.key, None)
        if value is not None:
            sets.append(f"{short.key}={json.dumps(value)}")
    return sets


def main(argv: list[str] | None = None) -> int:
    """Parse, load the config, run the stage or command; every failure is one line on stderr
    (user errors exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and (argv[0] in STAGES or argv[0] in COMMANDS) else ""
    if name in COMMANDS:
        return _guarded(name, lambda: _run_command(name, argv[1:]))
    return _guarded(name, lambda: _run_stage(argv))


def _run_stage(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    stage = STAGES[args.stage]
    from kdscale.config import load_config
    from kdscale.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, _shorthand_base(args, stage) + args.overrides)
    module_name, func_name = stage.target.split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(cfg) or 0)


def _run_command(name: str, argv: list[str]) -> int:
    from kdscale.logging import setup_logging

    setup_logging()
    module_name, func_name = COMMANDS[name][1].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(argv) or 0)


def _guarded(name: str, run: Callable[[], int]) -> int:
    """The last line of defence: ``run()``'s status, or one line for whatever it raised."""
    try:
        return run()
    except KDScaleError as exc:
        return _report(name, str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print(f"{_prog(name)}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise  # --help, --version
    except BaseException as exc:  # noqa: BLE001 - anything else (torch's CheckpointException is
        # a BaseException) still ends in one line
        message, status = describe_failure(exc)
        return _report(name, f"{message} ({_save_traceback(name, exc)})", status)


def _prog(name: str) -> str:
    return f"kdscale {name}" if name else "kdscale"


def _report(name: str, message: str, status: int) -> int:
    one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"{_prog(name)}: error: {one_line}", file=sys.stderr)
    return status


def _save_traceback(name: str, exc: BaseException) -> str:
    """Write ``exc``'s traceback to a private file in the temp directory; say where."""
    text = "".join(traceback.format_exception(exc))
    try:
        fd, path = tempfile.mkstemp(prefix=f"kdscale-{name or 'cli'}-", suffix=".log")
        with os.fdopen(fd, "w") as handle:
            handle.write(f"kdscale {' '.join(sys.argv[1:])}\n{text}")
    except OSError as err:
        return f"traceback not saved: {err.strerror}"
    return f"traceback in {path}"


if __name__ == "__main__":
    sys.exit(main())
