"""Benchmark the teacher-target codec on real teacher outputs, against Megatron-LM's format.

    .venv/bin/python tools/bench/bench_codec.py                    # ~4k tokens, seq 1024
    .venv/bin/python tools/bench/bench_codec.py --tokens 8192 --reps 5

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
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import sysconfig
import tarfile
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
from kdscale.config.cache import CodecConfig  # noqa: E402
from kdscale.hub import resolve_model_dir  # noqa: E402
from kdscale.teacher.hf import HFTeacher  # noqa: E402

MODULES = ("json/decoder.py", "textwrap.py", "heapq.py", "bisect.py", "fnmatch.py",
           "dataclasses.py", "argparse.py", "shlex.py", "pprint.py", "string.py")
CODECS = {
    "kdscale-topk64": CodecConfig(kind="topk", k=64),
    "kdscale-topk64-zstd19": CodecConfig(kind="topk", k=64, zstd_level=19),
    "kdscale-topp95": CodecConfig(kind="topp", p=0.95, max_k=64),
    "kdscale-sampled50": CodecConfig(kind="sampled", draws=50),
}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="teacher tokens to score")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (member)")
    parser.add_argument("--chunk", type=int, default=256, help="teacher output-layer chunk")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (fastest)")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
