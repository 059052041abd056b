"""Benchmark the two training engines on one student: DeepSpeed ZeRO-1 and ZeRO-3 vs megatron.

    .venv/bin/python tools/bench/bench_engines.py                     # builds its own data
    .venv/bin/python tools/bench/bench_engines.py --tokens runs/tokens --cache runs/cache

One process, one rank (on CPU: gloo, a world of one). The same random Llama student (saved by
transformers; ``import-hf`` of it starts the megatron engine) trains on the same batches with
the same cached-target KD loss, schedule and optimizer settings in three real trainers: the
megatron engine (:class:`kdscale.train.megatron_engine.MegatronEngine`) and the DeepSpeed engine
(:class:`kdscale.train.deepspeed_engine.engine.DeepSpeedEngine`) at ZeRO stages 1 and 3, each
driven by the shared loop. Steps run in
alternating blocks after a warm-up block each; prints one JSON line per engine (median and
fastest step time) and a summary line with the ratios DeepSpeed / megatron (ratios inside one
run; absolute times depend on the machine). Data is built as in ``bench_train.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import _step_times, bench_parser, build_loop, run_bench  # noqa: E402

from kdscale.config import load_config  # noqa: E402


def _student(out: Path, args: argparse.Namespace) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=4 * args.seq_len, tie_word_embeddings=True,
    )).save_pretrained(out)  # fmt: skip
    return out


def _config(args: argparse.Namespace, out: Path, engine: dict):
    sets = {
        "train.tokens": str(args.tokens), "train.cache": str(args.cache), "train.out": str(out),
        "train.steps": 10_000, "train.global_batch": args.batch, "train.micro_batch": args.batch,
        "train.log_every": 10_000, "train.save_every": 0, "wandb.enabled": False,
    } | engine  # fmt: skip
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def _bench(args: argparse.Namespace, work: Path) -> None:
    from kdscale.config import ParallelConfig
    from kdscale.models.hf_io import import_hf
    from kdscale.models.parallel import destroy_parallel, initialize_parallel
    from kdscale.train.checks import check_run
    from kdscale.train.deepspeed_engine.checks import check_deepspeed_run
    from kdscale.train.deepspeed_engine.engine import DeepSpeedEngine
    from kdscale.train.megatron_engine import MegatronEngine

    hf = _student(work / "student", args)
    model = import_hf(hf, work / "student_mg")
    megatron = {f"model.{k}": v for k, v in model.model_dump(mode="json").items()}
    megatron |= {"train.init": str(work / "student_mg")}
    megatron_cfg = _config(args, work / "megatron", megatron)
    initialize_parallel(ParallelConfig(), seed=0)
    megatron_inputs = check_run(megatron_cfg, world_size=1)
    trainers = {
        "megatron": build_loop(
            megatron_cfg, megatron_inputs, MegatronEngine(megatron_cfg, megatron_inputs)
        )
    }
    for stage in (1, 3):
        cfg = _config(args, work / f"zero{stage}", {
            "train.engine": "deepspeed", "train.deepspeed.zero_stage": stage,
            "train.deepspeed.model": str(hf),
        })  # fmt: skip
        cfg, inputs, start = check_deepspeed_run(cfg, world_size=1)
        trainers[f"deepspeed_zero{stage}"] = build_loop(
            cfg, inputs, DeepSpeedEngine(cfg, inputs, start)
        )
    try:
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for trainer in trainers.values():
            _step_times(trainer, args.block)  # warm-up
        for _ in range(args.blocks):
            for name, trainer in trainers.items():
                times[name] += _step_times(trainer, args.block)
        medians = {name: statistics.median(t) for name, t in times.items()}
        tokens_per_step = args.batch * args.seq_len
        for name, median in medians.items():
            print(json.dumps({"measure": "step_time", "engine": name, "median_s": median,
                              "min_s": min(times[name]), "steps": len(times[name]),
                              "tokens_per_s": tokens_per_step / median}))  # fmt: skip
        print(json.dumps({"summary": {
            **{f"{name}_over_megatron_step_time": medians[name] / medians["megatron"]
               for name in medians if name != "megatron"},
            "model": {"layers": args.layers, "hidden": args.hidden, "vocab": 49152},
            "batch": args.batch, "seq_len": args.seq_len, "precision": "fp32",
        }}))  # fmt: skip
    finally:
        for trainer in trainers.values():
            trainer.close()
        destroy_parallel()


def main() -> None:
    run_bench(bench_parser(__doc__.splitlines()[0], "engine").parse_args(), "engines", _bench)


if __name__ == "__main__":
    main()
