"""A teacher at tensor-parallel T = 1 vs T = 2 on the same cores: cache tokens/s, bytes sent per
position by the vocab-parallel sparsifier, and each rank's peak RSS.

    .venv/bin/python tools/bench/bench_teacher_group.py                       # tiny, ~2 min on 2 cores
    .venv/bin/python tools/bench/bench_teacher_group.py --hidden 512 --layers 4

A random Llama teacher (``--hidden``, ``--layers``, SmolLM2's 49152-token vocabulary) is imported
as a kdscale model directory; for each codec (``topk``, ``sampled``) and T, T spawned ranks (gloo,
``--threads`` / T torch threads each, so both use the same cores) run the shard writer over the
same token shard (one warm-up batch first). Prints one JSON line per run, then one line per codec
with the T = 2 / T = 1 throughput ratio. ``bytes_per_position`` is what one rank sends in the
sparsifier's collectives (:func:`kdscale.cache.vocab_parallel.bytes_per_position`); the rank's
weights are ``weights_bytes``, its peak RSS includes the ~0.4 GB of torch + megatron imports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cli import main as kdscale_main  # noqa: E402

CODECS = {"topk": ["cache.codec.kind=topk", "cache.codec.k=64"],
          "sampled": ["cache.codec.kind=sampled", "cache.codec.draws=64"]}  # fmt: skip


def _teacher(root: Path, hidden: int, layers: int) -> Path:
    """A random Llama (heads of 64, at least 4; 2 query heads per KV group) as a kdscale model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdscale.hub import resolve_model_dir
    from kdscale.models.hf_io import import_hf

    torch.manual_seed(0)
    heads = max(4, hidden // 64)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, max_position_embeddings=4096,
                         tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40.0)  # a peaked, teacher-like distribution
    model.save_pretrained(root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_model_dir("smollm2-135m") / name, root / "hf" / name)
    import_hf(root / "hf", root / "teacher")
    return root / "teacher"


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: ru_maxrss would carry the parent's peak across the
    spawn's exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def _rank(rank: int, size: int, port: int, threads: int, teacher: str, tokens: str, sets: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))  # fmt: skip
    if size == 1:
        for key in ("RANK", "WORLD_SIZE"):
            del os.environ[key]
    torch.set_num_threads(threads)
    from kdscale.cache.vocab_parallel import bytes_per_position
    from kdscale.cache.writer import ShardTask, write_cache_shard
    from kdscale.config import load_config
    from kdscale.data.manifest import load_tokens_manifest
    from kdscale.teacher import build_teacher

    cfg = load_config(None, [f"cache.teacher.model={teacher}", "cache.teacher.backend=megatron",
                             f"cache.teacher.tensor_parallel={size}", "cache.batch_size=4", *sets]).cache  # fmt: skip
    model = build_teacher(cfg.teacher)
    manifest = load_tokens_manifest(tokens)
    shards = manifest.splits["train"].shards
    tasks = [ShardTask("train", str(Path(tokens) / s.name), s.sha256, f"{out}/{rank}-{s.name}", s.samples,
                       manifest.seq_len) for s in shards]  # fmt: skip
    write_cache_shard(tasks[0], model, cfg)  # warm-up
    start = time.perf_counter()
    for task in tasks[1:]:
        write_cache_shard(task, model, cfg)
    seconds = time.perf_counter() - start
    result = {
        "rank": rank,
        "tokens_per_s": sum(t.samples for t in tasks[1:]) * manifest.seq_len / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.gpt.parameters()),
        "bytes_per_position": bytes_per_position(cfg.codec, model.vocab_size) if size > 1 else 0,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    model.close()


def _run(size: int, threads: int, teacher: Path, tokens: Path, sets: list, out: Path) -> list[dict]:
    out.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank, args=(size, port, max(1, threads // size), str(teacher), str(tokens), sets, str(out)),
                       nprocs=size, start_method="spawn")  # fmt: skip
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4, help="per shard (the first shard warms up)")
    parser.add_argument("--source", default="stdlib:python/json/decoder.py")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-groups-") as tmp:
        root = Path(tmp)
        teacher = _teacher(root, args.hidden, args.layers)
        assert kdscale_main(["data", "--input", args.source, "--seq-len", str(args.seq_len),
                             "--shard-samples", str(args.samples), "--out", str(root / "tokens")]) == 0  # fmt: skip
        for codec, sets in CODECS.items():
            rates = {}
            for size in (1, 2):
                ranks = _run(size, args.threads, teacher, root / "tokens", sets, root / f"{codec}-{size}")
                rates[size] = ranks[0]["tokens_per_s"]
                print(json.dumps({"bench": "teacher_group", "codec": codec, "tensor_parallel": size,
                                  "hidden": args.hidden, "layers": args.layers, "threads": args.threads,
                                  "tokens_per_s": round(rates[size], 1),
                                  "bytes_per_position": ranks[0]["bytes_per_position"],
                                  "weights_mb_per_rank": [round(r["weights_bytes"] / 2**20, 1) for r in ranks],
                                  "peak_rss_mb_per_rank": [round(r["peak_rss_mb"]) for r in ranks]}), flush=True)  # fmt: skip
            print(json.dumps({"bench": "teacher_group", "codec": codec,
                              "tp2_over_tp1_tokens_per_s": round(rates[2] / rates[1], 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
