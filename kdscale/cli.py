"""The ``kdscale`` console entry point: one subcommand per pipeline stage.

Every subcommand takes ``--config FILE`` (repeatable) and ``--set a.b=c`` (repeatable); a few
shorthand flags set the most common keys of its section. Bad input exits with status 2 and a
one-line message. Stage modules are imported only when their subcommand runs, so ``--help``
stays fast.

    kdscale data --input stdlib:python --tokenizer smollm2-135m --seq-len 512 --out runs/tokens
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any

from kdscale import __version__
from kdscale.errors import KDScaleError


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
            Shorthand("--out", "data.out", "output directory"),
            Shorthand("--overwrite", "data.overwrite", "replace an existing output",
                      {"action": "store_true", "default": None}),
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: global options plus one subparser per stage."""
    parser = argparse.ArgumentParser(
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
    """Parse, load the config, run the stage; user errors exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stage = STAGES[args.stage]
    try:
        from kdscale.config import load_config
        from kdscale.logging import setup_logging

        setup_logging()
        cfg = load_config(args.config, _shorthand_base(args, stage) + args.overrides)
        module_name, func_name = stage.target.split(":")
        run = getattr(importlib.import_module(module_name), func_name)
        result = run(cfg)
    except KDScaleError as exc:
        one_line = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"kdscale {args.stage}: error: {one_line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"kdscale {args.stage}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
