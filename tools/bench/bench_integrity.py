"""Benchmark what the integrity checks cost: checkpoint checksums per GB, and the per-sample
content-key check of token reads against a training step.

    .venv/bin/python tools/bench/bench_integrity.py                 # 1 GB of checkpoint files
    .venv/bin/python tools/bench/bench_integrity.py --gb 4 --steps 6

Prints one JSON line per measurement and a summary line:

- ``checksums``: :func:`kdscale.integrity.write_checksums` (a save) and ``verify_checksums`` (a
  load) over ``--gb`` of files in ``--files`` files, hashed on kdscale's thread pool; seconds
  per GB, and the best single-thread sha256 rate over 64 MiB blocks (the figure a quiet core
  reaches; a busy shared machine makes the end-to-end times noisy). The files were just
  written, so they are in the page cache: this is the hashing cost (CPU); reading a checkpoint
  from storage that is slower than the hash adds nothing, since the load reads the same bytes
  again right after (and then finds them cached).
- ``sample_key``: decoding one token sample with and without the content-key check
  (blake2b-128 of its bytes + dtype/length checks), per sample, at several sample lengths.
- ``train_step``: a real ``kdscale train`` step (tiny student, one CPU rank) and what its reads
  cost with and without the key check, so the ratio is the check's share of a step.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.data.shards import decode_sample, decode_tokens, sample_key  # noqa: E402
from kdscale.integrity import verify_checksums, write_checksums  # noqa: E402


def _emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def bench_checksums(root: Path, gb: float, files: int) -> dict:
    size = int(gb * 2**30 / files)
    block = np.random.default_rng(0).integers(0, 255, 1 << 24, dtype=np.uint8).tobytes()
    for i in range(files):
        with open(root / f"__0_{i}.distcp", "wb") as handle:
            for start in range(0, size, len(block)):
                handle.write(block[: min(len(block), size - start)])
    total = files * size / 2**30
    started = time.perf_counter()
    write_checksums(root)
    saved = time.perf_counter() - started
    started = time.perf_counter()
    assert verify_checksums(root) == []
    loaded = time.perf_counter() - started
    chunk, best = block * 4, math.inf
    for _ in range(20):
        started = time.perf_counter()
        hashlib.sha256(chunk).digest()
        best = min(best, time.perf_counter() - started)
    return _emit({"bench": "checksums", "gb": round(total, 3), "files": files,
                  "threads": min(8, os.cpu_count() or 1),
                  "save_s_per_gb": round(saved / total, 3), "load_s_per_gb": round(loaded / total, 3),
                  "sha256_gb_per_s_one_thread_best": round(len(chunk) / 2**30 / best, 3)})  # fmt: skip


def _npy(tokens: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tokens, allow_pickle=False)
    return buffer.getvalue()


def bench_sample_key(lengths: list[int], repeats: int = 200, blocks: int = 40) -> list[dict]:
    """Per sample: decode alone, decode + check; alternating short blocks, best of each (a
    shared machine's load lands on some blocks, not on the best ones)."""
    records = []
    for length in lengths:
        tokens = np.random.default_rng(length).integers(0, 128_000, length, dtype=np.uint32)
        tokens = tokens.astype("<u4")
        blob, key = _npy(tokens), sample_key(tokens)
        decoders = {"plain": lambda: decode_tokens(blob, "x"),
                    "checked": lambda: decode_sample(blob, key, "x", tokens.dtype, length)}
        times = dict.fromkeys(decoders, math.inf)
        for _ in range(blocks):
            for name, decode in decoders.items():
                started = time.perf_counter()
                for _ in range(repeats):
                    decode()
                times[name] = min(times[name], (time.perf_counter() - started) / repeats)
        records.append(_emit({"bench": "sample_key", "tokens_per_sample": length,
                              "bytes": tokens.nbytes, "decode_us": round(times["plain"] * 1e6, 2),
                              "checked_us": round(times["checked"] * 1e6, 2),
                              "check_us": round((times["checked"] - times["plain"]) * 1e6, 2)}))
    return records


def bench_train_step(root: Path, steps: int) -> dict:
    """Step time of a real tiny run, and reading its steps' samples with/without the check."""
    from kdscale.cli import main
    from kdscale.data.manifest import load_tokens_manifest
    from kdscale.data.store import TokenStore

    tokens, run = root / "tokens", root / "run"
    assert main(["data", "--input", "stdlib:python/json", "--seq-len", "256",
                 "--shard-samples", "64", "--out", str(tokens)]) == 0  # fmt: skip
    sets = ["model.num_layers=2", "model.hidden_size=128", "model.ffn_hidden_size=352",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=49152",
            "model.max_position_embeddings=256", "train.global_batch=8", "train.micro_batch=4",
            "train.log_every=1", "train.save_every=0", "wandb.enabled=false"]  # fmt: skip
    assert main(["train", "--tokens", str(tokens), "--out", str(run), "--steps", str(steps),
                 *[a for s in sets for a in ("--set", s)]]) == 0  # fmt: skip
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [x["throughput/tokens_per_s"] for x in lines if "throughput/tokens_per_s" in x][1:]
    step_s = statistics.median(8 * 256 / r for r in rates)
    manifest = load_tokens_manifest(tokens)
    store = TokenStore(tokens, manifest, "train")
    count = min(len(store), 256)
    for i in range(count):  # index every shard first
        store.tokens(i)
    plain, checked = [], []
    for _ in range(20):
        started = time.perf_counter()
        for i in range(count):
            shard, position = store.locate(i)
            decode_tokens(store.files.read(store.paths[shard], store.index(shard), position), "x")
        plain.append((time.perf_counter() - started) / count)
        started = time.perf_counter()
        for i in range(count):
            store.tokens(i)
        checked.append((time.perf_counter() - started) / count)
    store.close()
    per_step = 8 * (min(checked) - min(plain))
    return _emit({"bench": "train_step", "global_batch": 8, "seq_len": 256,
                  "step_s": round(step_s, 4), "read_us_per_sample": round(min(plain) * 1e6, 2),
                  "checked_read_us_per_sample": round(min(checked) * 1e6, 2),
                  "check_s_per_step": round(per_step, 6),
                  "check_share_of_step": round(per_step / step_s, 6)})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint bytes to hash")
    parser.add_argument("--files", type=int, default=8, help="files they are split into")
    parser.add_argument("--steps", type=int, default=6, help="training steps to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdscale-bench-") as tmp:
        root = Path(tmp)
        (root / "ckpt").mkdir()
        sums = bench_checksums(root / "ckpt", args.gb, args.files)
        keys = bench_sample_key([33, 2049, 4097, 8193])
        step = bench_train_step(root, args.steps)
    _emit({"bench": "summary", "checksum_save_s_per_gb": sums["save_s_per_gb"],
           "checksum_load_s_per_gb": sums["load_s_per_gb"],
           "sha256_s_per_gb_one_quiet_core": round(1 / sums["sha256_gb_per_s_one_thread_best"], 3),
           "key_check_us_per_4097_token_sample": next(
               k["check_us"] for k in keys if k["tokens_per_sample"] == 4097),
           "key_check_share_of_tiny_cpu_step": step["check_share_of_step"]})  # fmt: skip


if __name__ == "__main__":
    main()
