"""Benchmark the fused LM+KD loss against megatron's LM cross-entropy alone, and dense KD.

    .venv/bin/python tools/bench/bench_kd_loss.py                 # V=128k, K=64, 512 tokens
    .venv/bin/python tools/bench/bench_kd_loss.py --tokens 256 --reps 3

Prints one JSON line per measurement, then a summary line with the ratios (goals: time ≤ 1.05,
peak memory ≤ 1.10 of megatron's ``vocab_parallel_cross_entropy``). Methods, each forward +
backward on the same fp32 logits ``[S, B, V]`` (TP = 1):

- ``megatron_ce``: ``tensor_parallel.vocab_parallel_cross_entropy`` (LM only; it overwrites its
  input logits with the softmax and then the gradient, its own memory trick);
- ``kdscale_kd_lm``: ``kd_lm_loss`` with top-K targets, α = 0.5 (LM and KD both live), T = 1;
- ``kdscale_kd_lm_t2``: the same at T = 2, where the softmax is recomputed in backward (two
  exponentials per logit each way instead of one in all);
- ``kdscale_lm``: ``kd_lm_loss`` with α = 0 (the same fused pass, LM gradient only);
- ``dense_kd_lm``: full-vocabulary KD from a dense teacher (``log_softmax`` of its logits) plus
  LM cross-entropy, written with plain torch ops.

Time: median of ``--reps`` interleaved repetitions in one process, in CPU seconds of the one
thread (``time.process_time``: other load on a shared machine stretches wall time, not CPU time).
Logits come from a graph node (``x.clone()``), as an output layer's would, so in-place tricks
apply to both fused methods.

Memory: one fresh subprocess per method, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
serves every tensor above 64 KiB by mmap and returns it on free — resident memory then tracks
live tensors (torch's CPU allocator does not cache). The logits come from ``hidden @ W``
(W = [8, V] leaf) as in a model; the peak is read from ``VmHWM`` after resetting it
(``/proc/self/clear_refs``) once the inputs exist; ``extra`` = peak − resident before the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cache.targets import SparseTargets  # noqa: E402
from kdscale.losses import KDLossConfig, kd_lm_loss  # noqa: E402

METHODS = ("megatron_ce", "kdscale_kd_lm", "kdscale_kd_lm_t2", "kdscale_lm", "dense_kd_lm")
KDSCALE = {  # method: (α, T)
    "kdscale_kd_lm": (0.5, 1.0),
    "kdscale_kd_lm_t2": (0.5, 2.0),
    "kdscale_lm": (0.0, 1.0),
}
HIDDEN = 8  # small: CPU bf16 matmul forward is very slow, and W.grad counts for every method
BF16_METHODS = ("megatron_ce", "kdscale_kd_lm", "dense_kd_lm")


def _make_inputs(args: argparse.Namespace):
    """Student logits base, top-K targets, labels, and a dense teacher, all seeded."""
    gen = torch.Generator().manual_seed(0)
    seq, batch, vocab = args.tokens // args.batch, args.batch, args.vocab
    ids = torch.multinomial(torch.ones(vocab).expand(seq * batch, vocab), args.k, generator=gen)
    probs = torch.softmax(torch.randn(seq * batch, args.k + 1, generator=gen), -1)
    targets = SparseTargets(
        ids.view(batch, seq, args.k),
        probs[:, : args.k].log().view(batch, seq, args.k),
        probs[:, args.k].log().view(batch, seq),
        "topk",
    )
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return seq, batch, targets, labels


def _loss_fn(method: str, args, targets, labels, teacher_SBV: torch.Tensor | None) -> Callable:
    """``fn(logits_SBV) -> scalar loss`` for ``method``."""
    if method == "megatron_ce":
        from megatron.core import tensor_parallel

        labels_SB = labels.t().contiguous()
        return lambda z: tensor_parallel.vocab_parallel_cross_entropy(z, labels_SB).sum()
    if method in KDSCALE:
        alpha, temperature = KDSCALE[method]
        cfg = KDLossConfig(kd_weight=alpha, temperature=temperature, chunk_elements=args.chunk_elements)
        return lambda z: kd_lm_loss(z, targets, labels, cfg).loss.sum()
    assert teacher_SBV is not None
    labels_SB = labels.t().reshape(-1)

    def dense(z: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(z, -1)
        logp = F.log_softmax(teacher_SBV, -1)
        kl = F.kl_div(logq, logp, log_target=True, reduction="sum")
        return 0.5 * kl + 0.5 * F.nll_loss(logq.view(-1, z.shape[-1]), labels_SB, reduction="sum")

    return dense


def _init_megatron() -> None:
    """A one-rank gloo group and megatron's parallel_state at TP = PP = 1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from kdscale.config import ParallelConfig
    from kdscale.models.parallel import initialize_parallel  # imports kdscale.models first

    initialize_parallel(ParallelConfig(), seed=0)


def _teacher(seq: int, batch: int, vocab: int) -> torch.Tensor:
    return torch.randn(seq, batch, vocab, generator=torch.Generator().manual_seed(1))


def run_time(args: argparse.Namespace) -> dict[str, float]:
    """Median fwd+bwd CPU milliseconds per method, interleaved repetitions."""
    _init_megatron()
    seq, batch, targets, labels = _make_inputs(args)
    base = torch.randn(seq, batch, args.vocab, generator=torch.Generator().manual_seed(2))
    teacher = _teacher(seq, batch, args.vocab)
    fns = {m: _loss_fn(m, args, targets, labels, teacher) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for method, fn in fns.items():
            x = base.clone().requires_grad_()
            z = x.clone()  # a non-leaf graph node, like an output layer's logits
            start = time.process_time()
            fn(z).backward()
            elapsed = time.process_time() - start
            if rep:
                times[method].append(elapsed * 1e3)
            del x, z
    medians = {m: statistics.median(t) for m, t in times.items()}
    for method, ms in medians.items():
        print(json.dumps({"bench": "kd_loss_time", "method": method, "ms_median": round(ms, 1),
                          "ms_all": [round(t, 1) for t in times[method]], **_shape(args)}))  # fmt: skip
    return medians


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak resident memory of one method's fwd+bwd (prints one JSON line)."""
    if args.method == "megatron_ce":
        _init_megatron()
    seq, batch, targets, labels = _make_inputs(args)
    teacher = _teacher(seq, batch, args.vocab) if args.method == "dense_kd_lm" else None
    fn = _loss_fn(args.method, args, targets, labels, teacher)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hidden = torch.randn(seq, batch, HIDDEN, dtype=dtype)
    weight = torch.randn(HIDDEN, args.vocab, dtype=dtype, requires_grad=True)
    logits = hidden @ weight
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    fn(logits).backward()
    peak = _status_kib("VmHWM")
    logits_mib = logits.numel() * logits.element_size() / 2**20
    print(json.dumps({"bench": "kd_loss_memory", "method": args.method, "dtype": args.dtype,
                      "logits_mib": round(logits_mib, 1), "before_mib": round(before / 1024, 1),
                      "peak_extra_mib": round((peak - before) / 1024, 1), **_shape(args)}))  # fmt: skip


def run_memory(args: argparse.Namespace, dtype: str, methods: tuple[str, ...]) -> dict[str, dict]:
    """Spawn one fresh child per method; return its JSON record."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    records = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--memory-child", method, "--dtype", dtype,
               *_passthrough(args)]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        print(line)
        records[method] = json.loads(line)
    return records


def _shape(args: argparse.Namespace) -> dict:
    return {"tokens": args.tokens, "vocab": args.vocab, "k": args.k, "threads": args.threads}


def _passthrough(args: argparse.Namespace) -> list[str]:
    return ["--tokens", str(args.tokens), "--batch", str(args.batch), "--vocab", str(args.vocab),
            "--k", str(args.k), "--threads", str(args.threads),
            "--chunk-elements", str(args.chunk_elements)]  # fmt: skip


def main() -> None:
    """Parse arguments; time in this process, measure memory in children; print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="S·B token positions")
    parser.add_argument("--batch", type=int, default=2, help="B (S = tokens / B)")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--k", type=int, default=64, help="teacher support size")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)"
    )
    parser.add_argument("--chunk-elements", type=int, default=KDLossConfig().chunk_elements)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="memory child")
    parser.add_argument("--memory-child", dest="method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.method:
        memory_child(args)
        return
    times = run_time(args)
    summary = {"bench": "kd_loss_summary", **_shape(args)}
    for dtype, methods in (("fp32", METHODS), ("bf16", BF16_METHODS)):
        mem = run_memory(args, dtype, methods)
        base = mem["megatron_ce"]
        for method in methods[1:]:
            summary[f"{dtype}_peak_extra_ratio_{method}"] = round(
                mem[method]["peak_extra_mib"] / max(base["peak_extra_mib"], 1e-9), 3
            )
            summary[f"{dtype}_peak_total_ratio_{method}"] = round(
                (mem[method]["logits_mib"] + mem[method]["peak_extra_mib"])
                / (base["logits_mib"] + base["peak_extra_mib"]),
                3,
            )
    for method in METHODS[1:]:
        summary[f"time_ratio_{method}"] = round(times[method] / times["megatron_ce"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
