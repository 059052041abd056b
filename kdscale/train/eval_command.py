"""``kdscale eval CKPT --data TOKENS_DIR [--cache CACHE_DIR] [--json]``: evaluate a checkpoint.

    kdscale eval runs/student --data runs/tokens --cache runs/cache --json
    {"tokens": 4832, "lm_loss": 3.41, "ppl": 30.3, "kl": 0.52}

``CKPT`` is a run directory (its latest checkpoint), its ``checkpoints/`` or one step directory;
the checkpoint holds the model config it was built from (and the run's ``loss`` section, which
defines the KL), so nothing else is needed. Prints tokens evaluated, LM loss, perplexity and,
with a cache of the same tokens, the KL to the teacher. Without torchrun it runs in this
process (a world of one); under torchrun the samples are split over data-parallel ranks and
``--tensor``/``--pipeline`` set the model-parallel layout. Arguments are parsed before
megatron is imported, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdscale eval",
        description="Evaluate a checkpoint on held-out token shards: tokens evaluated, LM loss, "
        "perplexity and, with --cache, KL to the teacher.",
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="run directory or checkpoint step")
    parser.add_argument("--data", required=True, metavar="TOKENS_DIR", help="token directory")
    parser.add_argument("--cache", metavar="CACHE_DIR", help="teacher-target cache of TOKENS_DIR")
    parser.add_argument("--split", default="eval", help="split to evaluate (default: eval)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate at most N samples")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per forward pass")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``kdscale eval``: returns a process exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    from kdscale.config import ParallelConfig
    from kdscale.train.evaluate import evaluate_model

    result = evaluate_model(
        args.checkpoint, args.data, cache_dir=args.cache, split=args.split,
        limit=args.max_samples, micro_batch=args.micro_batch,
        parallel=ParallelConfig(tensor=args.tensor, pipeline=args.pipeline),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(result.as_dict()))
        else:
            print(f"tokens evaluated: {result.tokens:,}")
            print(f"LM loss:          {result.lm_loss:.4f}")
            print(f"perplexity:       {result.ppl:.3f}")
            if result.kl is not None:
                print(f"KL to teacher:    {result.kl:.4f}")
    return 0
