"""Cache-stage throughput vs the bare teacher forward on the same tokens (goal: ratio ≥ 0.95).

    python tools/bench/bench_cache_stage.py [--teacher smollm2-135m] [--seq-len 256] [--threads 2]

Prints JSON lines: the bare teacher's tokens/s (forward + output layer, nothing kept), the
in-process shard writer's tokens/s (teacher + sparsify + fidelity probes + encode + tar write,
encoding overlapped on a background thread), and their ratio, for each codec kind. The two
alternate for ``--rounds`` rounds and each keeps its best, so a noisy neighbour hurts both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdscale.cache.writer import ShardTask, write_cache_shard
from kdscale.cli import main as kdscale_main
from kdscale.config import load_config
from kdscale.data.manifest import load_tokens_manifest
from kdscale.data.shards import iter_token_shard
from kdscale.teacher import build_teacher


def bare_teacher_rate(teacher, samples: list[np.ndarray], batch: int, chunk: int) -> float:
    start = time.perf_counter()
    for begin in range(0, len(samples), batch):
        inputs = torch.from_numpy(np.stack([t[:-1] for t in samples[begin : begin + batch]]).astype(np.int64))
        for _ in teacher.logits_chunks(inputs, chunk):
            pass
    return sum(len(t) - 1 for t in samples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", default="stdlib:python/json/decoder.py")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokens_dir = Path(tmp) / "tokens"
        assert kdscale_main(["data", "--input", args.source, "--seq-len", str(args.seq_len),
                             "--shard-samples", "100000", "--out", str(tokens_dir)]) == 0
        shard = load_tokens_manifest(tokens_dir).splits["train"].shards[0]
        samples = [t for _, t in iter_token_shard(tokens_dir / shard.name)]
        for kind in ("topk", "sampled"):
            cfg = load_config(None, [f"cache.teacher.model={args.teacher}", f"cache.codec.kind={kind}"]).cache
            teacher = build_teacher(cfg.teacher)
            bare_teacher_rate(teacher, samples[:1], cfg.batch_size, cfg.teacher.chunk)  # warm-up
            task = ShardTask("train", str(tokens_dir / shard.name), shard.sha256, str(Path(tmp) / f"{kind}.tar"),
                             shard.samples, args.seq_len)
            bare = staged = 0.0
            for _ in range(args.rounds):
                bare = max(bare, bare_teacher_rate(teacher, samples, cfg.batch_size, cfg.teacher.chunk))
                start = time.perf_counter()
                record = write_cache_shard(task, teacher, cfg)
                staged = max(staged, record.tokens / (time.perf_counter() - start))
            print(json.dumps({
                "bench": "cache_stage", "kind": kind, "teacher": args.teacher, "tokens": record.tokens,
                "threads": args.threads, "rounds": args.rounds, "bare_teacher_tok_s": round(bare, 1), "cache_stage_tok_s": round(staged, 1),
                "ratio": round(staged / bare, 3), "goal": ">= 0.95", "bytes_per_token": round(record.bytes / record.tokens, 1),
            }))


if __name__ == "__main__":
    main()
