"""Benchmark the training step: cached-target KD against LM loss only, and the loader against both.

    .venv/bin/python tools/bench/bench_train.py                       # builds its own data
    .venv/bin/python tools/bench/bench_train.py --tokens runs/tokens --cache runs/cache

Prints one JSON line per measurement, then a summary line with the ratios (goals: KD step time
≤ 1.05 × the LM-only step; loader tokens/s ≥ 10 × the KD step's tokens/s). One process, one
rank, the real trainer (megatron DDP, optimizer, schedule, prefetching loader): two trainers of
the same student on the same batches, one with the cache (``kd_lm_loss``, top-K targets decoded
by the loader thread) and one without (megatron's vocab-parallel cross-entropy). Steps run in
alternating blocks (KD block, LM block, ...) after a warm-up block each; the figure is the
median step time (the fastest step is printed too: on a shared machine it is the steadier one). The loader figure is the time to read and decode whole steps (tokens + cached
targets) on one thread, no model.

Without ``--tokens``/``--cache`` it makes them in a temporary directory: ``kdscale data`` on the
stdlib ``json`` package with the SmolLM2 fixture tokenizer, then ``kdscale cache`` (local Ray)
with a small random Llama teacher that shares the tokenizer.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cli import main as kdscale  # noqa: E402
from kdscale.config import load_config  # noqa: E402


def _make_inputs(root: Path, seq_len: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdscale.hub import resolve_model_dir

    tokens, cache, teacher = root / "tokens", root / "cache", root / "teacher"
    assert kdscale(["data", "--input", "stdlib:python/json", "--seq-len", str(seq_len),
                    "--shard-samples", "64", "--out", str(tokens)]) == 0  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4 * seq_len,
        tie_word_embeddings=True,
    )).save_pretrained(teacher)  # fmt: skip
    fixture = resolve_model_dir("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture / name, teacher / name)
    assert kdscale(["cache", "--tokens", str(tokens), "--out", str(cache), "--teacher",
                    str(teacher), "--set", "cache.splits=[train]",
                    "--set", "wandb.enabled=false"]) == 0  # fmt: skip
    return tokens, cache


def _config(args: argparse.Namespace, out: Path, cache: Path | None):
    sets = {
        "model.num_layers": args.layers, "model.hidden_size": args.hidden,
        "model.ffn_hidden_size": args.hidden * 11 // 4, "model.num_attention_heads": 8,
        "model.num_query_groups": 4, "model.vocab_size": 49152,
        "model.max_position_embeddings": 4096, "train.tokens": str(args.tokens),
        "train.out": str(out), "train.steps": 10_000, "train.global_batch": args.batch,
        "train.micro_batch": args.batch, "train.log_every": 10_000, "train.save_every": 0,
        "train.stop_check_every": args.stop_check_every,
        "wandb.enabled": False,
    }  # fmt: skip
    if cache is not None:
        sets["train.cache"] = str(cache)
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _step_times(loop, count: int) -> list[float]:
    """Seconds of ``count`` loop iterations as ``fit`` runs them between log steps: the step
    and the end-of-step bookkeeping (stop checks), no logging, evaluation or saving."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        loop.train_step()
        loop.end_of_step()
        times.append(time.perf_counter() - start)
    return times


def build_loop(cfg, inputs, engine):
    """The shared training loop of ``cfg`` around ``engine`` (outside ``fit``)."""
    from kdscale.train.loop import StopRequest, TrainLoop

    return TrainLoop(cfg, inputs, engine, StopRequest())


def _bench(args: argparse.Namespace, work: Path) -> None:
    from kdscale.models.parallel import destroy_parallel, initialize_parallel
    from kdscale.train.checks import check_run
    from kdscale.train.megatron_engine import MegatronEngine

    configs = {"kd": _config(args, work / "kd", args.cache), "lm": _config(args, work / "lm", None)}
    inputs = {name: check_run(cfg, world_size=1) for name, cfg in configs.items()}
    seq_len = inputs["kd"].tokens.seq_len
    step_tokens = args.batch * seq_len
    initialize_parallel(configs["kd"].parallel, seed=0)
    trainers = {
        name: build_loop(cfg, inputs[name], MegatronEngine(cfg, inputs[name]))
        for name, cfg in configs.items()
    }
    try:
        times: dict[str, list[float]] = {"kd": [], "lm": []}
        for name, trainer in trainers.items():
            _step_times(trainer, args.block)  # warm-up
        for _ in range(args.blocks):
            for name, trainer in trainers.items():
                times[name] += _step_times(trainer, args.block)
        medians = {name: statistics.median(t) for name, t in times.items()}
        fastest = {name: min(t) for name, t in times.items()}
        for name, median in medians.items():
            print(json.dumps({"measure": "step_time", "objective": name, "median_s": median,
                              "min_s": fastest[name], "steps": len(times[name]),
                              "tokens_per_step": step_tokens,
                              "tokens_per_s": step_tokens / median}))  # fmt: skip
        loader = trainers["kd"].loader
        start = time.perf_counter()
        for step in range(args.loader_steps):
            loader.step_batches(step * args.batch)
        loader_s = time.perf_counter() - start
        loader_tps = args.loader_steps * step_tokens / loader_s
        print(json.dumps({"measure": "loader", "steps": args.loader_steps,
                          "tokens_per_s": loader_tps, "threads": 1}))  # fmt: skip
        print(json.dumps({"summary": {
            "kd_over_lm_step_time": medians["kd"] / medians["lm"], "goal_at_most": 1.05,
            "kd_over_lm_fastest_step": fastest["kd"] / fastest["lm"],
            "loader_over_kd_step_tokens_per_s": loader_tps * medians["kd"] / step_tokens,
            "goal_at_least": 10.0,
            "model": {"layers": args.layers, "hidden": args.hidden, "vocab": 49152},
            "batch": args.batch, "seq_len": seq_len,
        }}))  # fmt: skip
    finally:
        for trainer in trainers.values():
            trainer.close()
        destroy_parallel()


def bench_parser(description: str, compared: str) -> argparse.ArgumentParser:
    """The flags every training benchmark takes: data, tiny model, batch, timed blocks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokens", type=Path, help="token directory (default: build one)")
    parser.add_argument("--cache", type=Path, help="its cache (default: build one)")
    parser.add_argument("--seq-len", type=int, default=128, help="when building data")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="samples per step (one micro-batch)")
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=4, help=f"timed blocks per {compared}")
    parser.add_argument("--stop-check-every", type=int, default=10,
                        help="train.stop_check_every of the timed runs")
    return parser


def run_bench(args: argparse.Namespace, name: str, bench: Callable[..., None]) -> None:
    """Build the tokens and cache unless given, then run ``bench(args, work_dir)``."""
    with tempfile.TemporaryDirectory(prefix=f"kdscale-bench-{name}-") as tmp:
        work = Path(tmp)
        if args.tokens is None or args.cache is None:
            args.tokens, args.cache = _make_inputs(work / "data", args.seq_len)
        bench(args, work)


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], "objective")
    parser.add_argument("--loader-steps", type=int, default=20)
    run_bench(parser.parse_args(), "train", _bench)


if __name__ == "__main__":
    main()
