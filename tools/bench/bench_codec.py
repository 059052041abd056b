"""Benchmark the teacher-target codec on real teacher outputs, against Megatron-LM's format.

    .venv/bin/python tools/bench/bench_codec.py                    # ~4k tokens, seq 1024
    .venv/bin/python tools/bench/bench_codec.py --tokens 8192 --reps 5
    .venv/bin/python tools/bench/bench_codec.py --skip-writer     # no cache-writer RSS runs

The teacher is the SmolLM2-135M fixture (V = 49152) scoring Python standard-library sources
(a fixed list of modules, tokenized and packed into samples of ``--seq-len``). One JSON line per
codec, then a summary line with ratios measured in this run:

- ``kdscale-topk64`` (the default codec), ``kdscale-topk64-zstd19``, ``kdscale-topp95``,
  ``kdscale-sampled50`` (RS-KD, N = 50): one member per sample.
- ``megatron-topk64``: a re-implementation, from its description, of the offline format of
  Megatron-LM PR#5019: per iteration (here: 4 samples) ``torch.save`` of a dict of lists of
  ``[S, B, k]`` tensors (fp16 log-probs, uint16 low id bits, bool 17th id bit), zstd level 3,
  one tar member per iteration after a ``_meta.json`` member. The tail is rebuilt on read as
  ``1 - sum(p)`` (its "ghost token").

Figures: ``bytes_per_token`` (compressed payload) and ``tar_bytes_per_token`` (with tar
headers); ``kl_mean``/``kl_max``: KL(exact top-k + tail ‖ decoded) per position (value
quantization only; not for ``sampled``, whose values are exact counts); ``covered_mass``: the
teacher's mass on the kept ids; ``encode_tok_s``/``decode_tok_s``: one thread, fastest of
``--reps`` passes over all samples, the formats taking turns within each repetition;
decoding ends with int64 ids and float32 log-probs.
Megatron's rebuilt tail is empty wherever its fp16 probabilities add up to one or more
(``tail_lost_frac``); its ``kl_*`` figures cover the other positions.

Large supports (``kdscale-topk256``, ``-topk1024``, ``-topk4096``, ``kdscale-full`` = k = V,
and ``kdscale-full-zstd1`` at zstd level 1):
the same figures on the first ``--large-tokens`` teacher positions cut into members of
``--large-seq-len`` (``--large-reps`` passes). Then the cache writer (``write_cache_shard``:
teacher, sparsify, encode, quantization check, tar) runs in a fresh process per k (64 and the
large ones) over one token shard of ``--writer-samples`` samples of 256 tokens, batch 4, chunk
256; ``codec-writer`` lines give the RSS once the teacher is loaded (``loaded_rss_mb``), the
peak RSS while writing (``peak_rss_mb``: Linux's high-water mark, reset after loading so that
the loader's transient peak does not hide the writer's), tokens/s, bytes/token, and
``targets_mb``: one batch's decoded targets at that k (``B × S × k`` int64 ids + float32
log-probs), the memory any writer of such targets needs. The summary's
``writer_peak_over_k64_per_targets_mb`` divides the growth of the peak over the k = 64 run by
the growth of ``targets_mb``: a bounded ratio is peak RSS linear in k (a ``[K, K]`` temporary
would grow it with k).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cache.codec import decode, encode  # noqa: E402
from kdscale.cache.fidelity import fidelity, support_kl  # noqa: E402
from kdscale.cache.sparsify import sparsify  # noqa: E402
from kdscale.cache.targets import SparseTargets  # noqa: E402
from kdscale.cache.writer import ShardTask, write_cache_shard  # noqa: E402
from kdscale.cli import main as kdscale_main  # noqa: E402
from kdscale.config import load_config  # noqa: E402
from kdscale.config.cache import CodecConfig  # noqa: E402
from kdscale.data.manifest import load_tokens_manifest  # noqa: E402
from kdscale.hub import resolve_model_dir  # noqa: E402
from kdscale.teacher import build_teacher  # noqa: E402
from kdscale.teacher.hf import HFTeacher  # noqa: E402

MODULES = ("json/decoder.py", "textwrap.py", "heapq.py", "bisect.py", "fnmatch.py",
           "dataclasses.py", "argparse.py", "shlex.py", "pprint.py", "string.py")
CODECS = {
    "kdscale-topk64": CodecConfig(kind="topk", k=64),
    "kdscale-topk64-zstd19": CodecConfig(kind="topk", k=64, zstd_level=19),
    "kdscale-topp95": CodecConfig(kind="topp", p=0.95, max_k=64),
    "kdscale-sampled50": CodecConfig(kind="sampled", draws=50),
}
LARGE = {
    "kdscale-topk256": CodecConfig(k=256),
    "kdscale-topk1024": CodecConfig(k=1024),
    "kdscale-topk4096": CodecConfig(k=4096),
    "kdscale-full": CodecConfig(k="full"),
    "kdscale-full-zstd1": CodecConfig(k="full", zstd_level=1),
}
WRITER_K = (64, 256, 1024, 4096, "full")
MEGATRON_MICROBATCHES = 4


def teacher_samples(args: argparse.Namespace) -> tuple[list[torch.Tensor], int]:
    """Per sample: the teacher's float32 log-probs ``[S, V]`` (the bench keeps them whole)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in MODULES:
        ids += tokenizer((stdlib / name).read_text())["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= args.tokens:
            break
    tokens = torch.tensor(ids[: args.tokens - args.tokens % args.seq_len]).view(-1, args.seq_len)
    teacher = HFTeacher(model_dir)
    samples = []
    for row in tokens:
        blocks = [logp[0] for _, logp in teacher.logits_chunks(row[None], args.chunk)]
        samples.append(torch.cat(blocks))
    return samples, teacher.vocab_size


@dataclass
class Method:
    """One storage format under test: encode all samples, decode them back."""

    name: str
    targets: list[SparseTargets]
    encode: Callable[[list[SparseTargets]], Any]
    decode: Callable[[Any], list[SparseTargets]]
    encode_s: float = math.inf
    decode_s: float = math.inf


def time_interleaved(methods: list[Method], reps: int) -> dict[str, Any]:
    """Fastest of ``reps`` encode and decode passes per method, methods taking turns within each
    repetition so that load from other processes hits them alike; returns the encodings."""
    encoded = {}
    for _ in range(reps):
        for m in methods:
            start = time.perf_counter()
            encoded[m.name] = m.encode(m.targets)
            m.encode_s = min(m.encode_s, time.perf_counter() - start)
            start = time.perf_counter()
            m.decode(encoded[m.name])
            m.decode_s = min(m.decode_s, time.perf_counter() - start)
    return encoded


def tar_size(members: list[bytes]) -> int:
    """Bytes of a tar holding one member per sample (as the cache writer stores them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, data in enumerate(members):
            info = tarfile.TarInfo(f"{i:06d}.targets")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(buf.getvalue())


def kdscale_method(name: str, cfg: CodecConfig, logps: list[torch.Tensor], vocab: int) -> Method:
    """kdscale's codec: one member per sample."""
    return Method(
        name,
        [sparsify(lp, cfg, key=f"sample-{i}") for i, lp in enumerate(logps)],
        lambda targets: [encode(t, cfg, vocab) for t in targets],
        lambda blobs: [decode(b, cfg, vocab) for b in blobs],
    )


def kdscale_row(m: Method, cfg: CodecConfig, blobs: list[bytes], logps: list[torch.Tensor]) -> dict:
    """Sizes, speeds and fidelity of one kdscale codec."""
    decoded = m.decode(blobs)
    n_tokens = sum(lp.shape[0] for lp in logps)
    fid = [fidelity(lp, d, cfg.temperature) for lp, d in zip(logps, decoded)]
    row = {
        "bench": "codec", "codec": m.name, "tokens": n_tokens,
        "bytes_per_token": sum(map(len, blobs)) / n_tokens,
        "tar_bytes_per_token": tar_size(blobs) / n_tokens,
        "encode_tok_s": n_tokens / m.encode_s, "decode_tok_s": n_tokens / m.decode_s,
        "support_mean": float(sum(d.valid.sum() for d in decoded)) / n_tokens,
        "covered_mass": float(torch.cat([f.covered_mass for f in fid]).mean()),
        "tv_mean": float(torch.cat([f.tv for f in fid]).mean()),
    }
    if cfg.kind != "sampled":
        kl = torch.cat([support_kl(t, d)[0] for t, d in zip(m.targets, decoded)])
        row.update(kl_mean=float(kl.mean()), kl_max=float(kl.max()))
    return row


def megatron_encode(targets: list[SparseTargets]) -> bytes:
    """A tar of ``_meta.json`` plus one zstd-3 ``torch.save`` member per iteration."""
    compressor = zstandard.ZstdCompressor(level=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        meta = json.dumps({"saver": {"k": 64, "save_dtype": "fp16"}}).encode()
        members = [("_meta.json", meta)]
        for it in range(0, len(targets), MEGATRON_MICROBATCHES):
            values, low, high = [], [], []
            for t in targets[it : it + MEGATRON_MICROBATCHES]:
                ids_SBK = t.ids[0][:, None]  # [S, B=1, k], megatron's sequence-first layout
                values.append(t.logp[0][:, None].to(torch.float16))
                low.append((ids_SBK & 0xFFFF).to(torch.uint16))
                high.append((ids_SBK >> 16).to(torch.bool))
            payload = io.BytesIO()
            torch.save({"values": values, "indices_low": low, "bit_17": high}, payload)
            members.append((f"{it}.pt.zst", compressor.compress(payload.getvalue())))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def megatron_decode(blob: bytes) -> list[SparseTargets]:
    """Read every iteration back into int64 ids, float32 log-probs and the ghost-token tail."""
    decompressor = zstandard.ZstdDecompressor()
    out = []
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".pt.zst"):
                continue
            raw = decompressor.decompress(tar.extractfile(member).read())
            data = torch.load(io.BytesIO(raw), weights_only=True)
            for values, low, high in zip(data["values"], data["indices_low"], data["bit_17"]):
                ids = low.to(torch.int64) | (high.to(torch.int64) << 16)
                logp = values.float()
                tail = torch.log1p(-logp.exp().sum(-1).clamp(max=1.0))
                out.append(SparseTargets(ids.transpose(0, 1), logp.transpose(0, 1), tail.T, "topk"))
    return out


def megatron_row(m: Method, blob: bytes) -> dict:
    """Sizes, speeds and fidelity of the Megatron-LM format."""
    decoded = m.decode(blob)
    n_tokens = sum(t.shape[1] for t in m.targets)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        payload = sum(x.size for x in tar.getmembers() if x.name.endswith(".pt.zst"))
    kl = torch.cat([support_kl(t, d)[0] for t, d in zip(m.targets, decoded)])
    finite = kl[torch.isfinite(kl)]
    return {
        "bench": "codec", "codec": m.name, "tokens": n_tokens,
        "bytes_per_token": payload / n_tokens, "tar_bytes_per_token": len(blob) / n_tokens,
        "encode_tok_s": n_tokens / m.encode_s, "decode_tok_s": n_tokens / m.decode_s,
        "support_mean": 64.0, "kl_mean": float(finite.mean()), "kl_max": float(finite.max()),
        "tail_lost_frac": 1.0 - finite.numel() / kl.numel(),
    }


def large_rows(logps: list[torch.Tensor], vocab: int, args: argparse.Namespace) -> list[dict]:
    """The kdscale codec at large supports, on members of ``--large-seq-len`` positions."""
    members = [part for lp in logps for part in lp.split(args.large_seq_len)]
    members = members[: max(1, args.large_tokens // args.large_seq_len)]
    methods = [kdscale_method(name, cfg, members, vocab) for name, cfg in LARGE.items()]
    encoded = time_interleaved(methods, args.large_reps)
    return [
        {**kdscale_row(m, LARGE[m.name], encoded[m.name], members), "k": LARGE[m.name].support(vocab)}
        for m in methods
    ]


def writer_tokens(root: Path, samples: int) -> Path:
    """One token shard of ``samples`` 256-token samples of the bench's stdlib modules."""
    stdlib_inputs = [arg for name in MODULES for arg in ("--input", f"stdlib:python/{name}")]
    status = kdscale_main(["data", *stdlib_inputs, "--tokenizer", "smollm2-135m", "--seq-len", "256",
                           "--shard-samples", str(samples), "--out", str(root / "tokens")])
    assert status == 0
    return root / "tokens"


def proc_status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in MiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    assert match, field
    return int(match.group(1)) / 1024


def writer_child(k: str, tokens_dir: Path, threads: int) -> None:
    """One cache shard written at ``cache.codec.k=k`` in this process: print peak RSS etc."""
    torch.set_num_threads(threads)
    cfg = load_config(None, [f"cache.codec.k={k}", "cache.batch_size=4", "cache.teacher.chunk=256"]).cache
    teacher = build_teacher(cfg.teacher)
    shard = load_tokens_manifest(tokens_dir).splits["train"].shards[0]
    task = ShardTask("train", str(tokens_dir / shard.name), shard.sha256, str(tokens_dir.parent / f"cache-{k}.tar"),
                     shard.samples, 256)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (VmHWM := VmRSS)
    loaded_mb = proc_status_mb("VmRSS")
    start = time.perf_counter()
    record = write_cache_shard(task, teacher, cfg)
    seconds = time.perf_counter() - start
    support = cfg.codec.support(teacher.vocab_size)
    print(json.dumps({
        "bench": "codec-writer", "k": support, "tokens": record.tokens,
        "targets_mb": cfg.batch_size * 256 * support * 12 / 2**20,
        "peak_rss_mb": proc_status_mb("VmHWM"), "loaded_rss_mb": loaded_mb,
        "writer_tok_s": record.tokens / seconds, "bytes_per_token": record.bytes / record.tokens,
        "quant_kl_mean": record.fidelity.quant_kl_mean, "threads": threads,
    }))


def writer_rows(args: argparse.Namespace) -> list[dict]:
    """The writer's peak RSS per k, each k in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as tmp:
        tokens_dir = writer_tokens(Path(tmp), args.writer_samples)
        for k in WRITER_K:
            out = subprocess.run(
                [sys.executable, __file__, "--writer-child", str(k), "--writer-tokens", str(tokens_dir),
                 "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def large_summary(large: list[dict], writer: list[dict]) -> dict:
    """Ratios within this run: bytes per slot, and the writer's peak RSS growth over k = 64 per
    MB of one batch's targets."""
    summary: dict[str, Any] = {"bench": "codec-large-summary"}
    for row in large:
        summary[f"{row['codec']}_bytes_per_slot"] = row["bytes_per_token"] / row["k"]
    if writer:
        base = writer[0]
        summary["writer_peak_over_k64_per_targets_mb"] = {
            str(w["k"]): (w["peak_rss_mb"] - base["peak_rss_mb"]) / (w["targets_mb"] - base["targets_mb"])
            for w in writer[1:]
        }
        summary["writer_peak_full_over_k64"] = writer[-1]["peak_rss_mb"] / base["peak_rss_mb"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="teacher tokens to score")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (member)")
    parser.add_argument("--chunk", type=int, default=256, help="teacher output-layer chunk")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (fastest)")
    parser.add_argument("--large-tokens", type=int, default=1024, help="positions for large k")
    parser.add_argument("--large-seq-len", type=int, default=256, help="positions per member, large k")
    parser.add_argument("--large-reps", type=int, default=3, help="timed repetitions, large k")
    parser.add_argument("--writer-samples", type=int, default=8, help="256-token samples per writer run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each writer run")
    parser.add_argument("--skip-writer", action="store_true", help="no cache-writer RSS runs")
    parser.add_argument("--writer-child", help=argparse.SUPPRESS)
    parser.add_argument("--writer-tokens", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer_child:
        writer_child(args.writer_child, args.writer_tokens, args.threads)
        return
    logps, vocab = teacher_samples(args)
    torch.set_num_threads(1)  # per-core encode/decode figures
    methods = [kdscale_method(name, cfg, logps, vocab) for name, cfg in CODECS.items()]
    top64 = methods[0].targets  # Megatron stores the same top-64 targets
    methods.append(Method("megatron-topk64", top64, megatron_encode, megatron_decode))
    encoded = time_interleaved(methods, args.reps)
    rows = {m.name: kdscale_row(m, CODECS[m.name], encoded[m.name], logps) for m in methods[:-1]}
    rows["megatron-topk64"] = megatron_row(methods[-1], encoded["megatron-topk64"])
    for row in rows.values():
        print(json.dumps(row))
    ours, theirs = rows["kdscale-topk64"], rows["megatron-topk64"]
    print(json.dumps({
        "bench": "codec-summary",
        "topk64_bytes_megatron_over_kdscale": theirs["bytes_per_token"] / ours["bytes_per_token"],
        "topk64_decode_kdscale_over_megatron": ours["decode_tok_s"] / theirs["decode_tok_s"],
        "topk64_bytes_goal_128": ours["bytes_per_token"] <= 128,
        "sampled50_bytes_goal_24": rows["kdscale-sampled50"]["bytes_per_token"] <= 24,
        "sampled50_over_topk64_bytes": rows["kdscale-sampled50"]["bytes_per_token"]
        / ours["bytes_per_token"],
    }))
    large = large_rows(logps, vocab, args)
    del logps, methods, encoded
    for row in large:
        print(json.dumps(row))
    writer = [] if args.skip_writer else writer_rows(args)
    for row in writer:
        print(json.dumps(row))
    print(json.dumps(large_summary(large, writer)))


if __name__ == "__main__":
    main()
