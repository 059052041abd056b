"""``kdscale eval CKPT --data TOKENS_DIR [--cache CACHE_DIR] [--json]``: evaluate a checkpoint.

    kdscale eval runs/student --data runs/tokens --cache runs/cache --json
    {"tokens": 4832, "lm_loss": 3.41, "ppl": 30.3, "kl_teacher_tail": 0.52, "kd_loss": 0.52}

``CKPT`` is a run directory (its latest checkpoint), its ``checkpoints/`` or one step directory,
a model directory, or a Hugging Face directory or fixture name (imported once); the checkpoint
holds the model config it was built from (and the run's ``loss`` section), so nothing else is
needed. Prints tokens evaluated, LM loss, perplexity and, with a cache of the same tokens, the
KL to the teacher under one definition for every run (``kl_teacher_tail``: the teacher's cached
top ids plus its tail bucket) and the run's own KD loss (``kd_loss``: its divergence,
missing-mass buckets and temperature). Without torchrun it runs in this
process (a world of one); under torchrun the samples are split over data-parallel ranks and
``--tensor``/``--pipeline`` set the model-parallel layout. Arguments are parsed before
megatron is imported, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdscale.errors import ArgumentParser, positive_int


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="kdscale eval",
        description="Evaluate a checkpoint on held-out token shards: tokens evaluated, LM loss, "
        "perplexity and, with --cache, KL to the teacher.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="run directory or checkpoint step")
    parser.add_argument("--data", required=True, metavar="TOKENS_DIR", help="token directory")
    parser.add_argument("--cache", metavar="CACHE_DIR", help="teacher-target cache of TOKENS_DIR")
    parser.add_argument("--split", default="eval", help="split to evaluate (default: eval)")
    parser.add_argument("--max-samples", type=positive_int, default=None,
                        help="evaluate at most N samples")
    parser.add_argument("--micro-batch", type=positive_int, default=4,
                        help="samples per forward pass")
    parser.add_argument("--tensor", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pipeline", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--skip-checksums", action="store_true",
                        help="load the checkpoint without verifying its checksums.json (only for "
                        "a checkpoint you have verified yourself)")
    return parser.parse_args(argv)


def _objective(checkpoint: str) -> str:
    """The loss settings that define the checkpoint's ``kd_loss``."""
    from kdscale.models.checkpoints import read_run_config, resolve_checkpoint

    loss = read_run_config(resolve_checkpoint(checkpoint, "CKPT")).loss
    return (
        f"loss.divergence={loss.divergence}, loss.missing_mass={loss.missing_mass}, "
        f"loss.temperature={loss.temperature:g}"
    )


def main(argv: list[str] | None = None) -> int:
    """``kdscale eval``: returns a process exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    from kdscale.config import ParallelConfig
    from kdscale.train.evaluate import evaluate_model

    result = evaluate_model(
        args.checkpoint, args.data, cache_dir=args.cache, split=args.split,
        limit=args.max_samples, micro_batch=args.micro_batch,
        parallel=ParallelConfig(tensor=args.tensor, pipeline=args.pipeline),
        verify=not args.skip_checksums,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            print(f"tokens evaluated: {result.tokens:,}")
            print(f"LM loss:          {result.lm_loss:.4f}")
            print(f"perplexity:       {result.ppl:.3f}")
            if result.kl_teacher_tail is not None:
                print(f"KL to teacher:    {result.kl_teacher_tail:.4f}  "
                      "(kl_teacher_tail: cached top ids + tail bucket)")  # fmt: skip
                print(f"run's KD loss:    {result.kd_loss:.4f}  "
                      f"(kd_loss: {_objective(args.checkpoint)})")  # fmt: skip
    return 0
