"""Benchmark the output layer fused into the KD loss against the unfused paths (CPU, one thread).

    .venv/bin/python tools/bench/bench_head_loss.py                     # V=128k and 256k, 4096 tokens
    .venv/bin/python tools/bench/bench_head_loss.py --vocab 32768 --tokens 1024 --reps 1

Every method runs forward + backward from the same final hidden states ``[S, B, H]`` (H=1024)
and output weight ``[V, H]`` (fp32, TP = 1), with top-K teacher targets, α = 0.5:

- ``fused``: ``head_kd_lm_loss(hidden, weight, ...)`` (T = 1); ``fused_t2`` the same at T = 2;
- ``unfused``: the output layer ``hidden @ weightᵀ``, then ``kd_lm_loss`` (T = 1); ``unfused_t2``;
- ``megatron_ce``: the output layer, then megatron's ``vocab_parallel_cross_entropy`` (LM only);
- ``dense_kd``: the output layer, then full-vocabulary KD from dense teacher log-probs (an input,
  like a dense cache) plus the LM cross-entropy, in plain torch.

Each measurement is one fresh subprocess (``--reps`` rounds, methods interleaved within a round)
with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor above 64 KiB by mmap and
returns it on free: resident memory tracks live tensors (torch's CPU allocator does not cache).
The child builds the inputs, runs a small warm-up of the same method, resets ``VmHWM``
(``/proc/self/clear_refs``), then times one forward + backward: wall seconds, and the CPU seconds
of its one thread, which the summary's ratios use (other load on a shared machine stretches wall
time, not CPU time). ``peak_extra`` = peak − resident
before (it includes the gradients of hidden and weight, which every method returns);
``peak_extra_beyond_grads`` subtracts their size. A child gets ``--mem-budget-gib`` of address
space beyond its inputs: a method that needs more is reported as skipped, not run into swap.

Prints one JSON line per measurement, then one summary line per vocabulary with the ratios to
``unfused`` (goals for ``fused``: peak extra ≤ 0.15×, time ≤ 1.10×).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from kdscale.losses import KDLossConfig, head_kd_lm_loss, kd_lm_loss  # noqa: E402

METHODS = ("fused", "unfused", "megatron_ce", "dense_kd", "fused_t2", "unfused_t2")
KDSCALE = {"fused": 1.0, "unfused": 1.0, "fused_t2": 2.0, "unfused_t2": 2.0}  # method: T
ALPHA = 0.5


def _inputs(tokens: int, batch: int, vocab: int, hidden: int, k: int):
    """Hidden states, output weight, top-K targets and labels, seeded."""
    gen = torch.Generator().manual_seed(0)
    seq = tokens // batch
    start = torch.randint(0, vocab, (tokens, 1), generator=gen)
    ids = (start + torch.arange(k) * (vocab // k)) % vocab  # k distinct ids across the vocabulary
    probs = torch.softmax(torch.randn(tokens, k + 1, generator=gen), -1)
    targets = SparseTargets(
        ids.view(batch, seq, k),
        probs[:, :k].log().view(batch, seq, k),
        probs[:, k].log().view(batch, seq),
        "topk",
    )
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    hidden_SBH = torch.randn(seq, batch, hidden, generator=gen)
    weight_VH = torch.randn(vocab, hidden, generator=gen) * hidden**-0.5
    return hidden_SBH, weight_VH, targets, labels


def _init_megatron() -> None:
    """A one-rank gloo group and megatron's parallel_state at TP = PP = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import kdscale.models  # noqa: F401  (megatron-core on CPU)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def _method(name: str, targets: SparseTargets, labels: torch.Tensor, teacher_logp_SBV) -> Callable:
    """``fn(hidden_SBH, weight_VH) -> scalar loss`` for ``name``."""
    if name in KDSCALE:
        cfg = KDLossConfig(kd_weight=ALPHA, temperature=KDSCALE[name])
        if name.startswith("fused"):
            return lambda h, w: head_kd_lm_loss(h, w, targets, labels, cfg).loss.sum()
        return lambda h, w: kd_lm_loss(h @ w.t(), targets, labels, cfg).loss.sum()
    if name == "megatron_ce":
        from megatron.core import tensor_parallel

        labels_SB = labels.t().contiguous()
        return lambda h, w: tensor_parallel.vocab_parallel_cross_entropy(h @ w.t(), labels_SB).sum()
    labels_N = labels.t().reshape(-1)

    def dense(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(h @ w.t(), -1)
        kl = F.kl_div(logq, teacher_logp_SBV, log_target=True, reduction="sum")
        return ALPHA * kl + (1 - ALPHA) * F.nll_loss(logq.flatten(0, 1), labels_N, reduction="sum")

    return dense


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _prepare(name: str, args: argparse.Namespace, vocab: int) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """The loss function of ``name`` and its two leaf inputs, for ``vocab``."""
    hidden, weight, targets, labels = _inputs(args.tokens, args.batch, vocab, args.hidden, args.k)
    teacher = None
    if name == "dense_kd":
        gen = torch.Generator().manual_seed(1)
        teacher = F.log_softmax(torch.randn(*hidden.shape[:2], vocab, generator=gen), -1)
    fn = _method(name, targets, labels, teacher)
    return fn, hidden.requires_grad_(), weight.requires_grad_()


def child(args: argparse.Namespace) -> None:
    """In a fresh process: one method at one vocabulary; prints one JSON line."""
    torch.set_num_threads(args.threads)
    if args.method == "megatron_ce":
        _init_megatron()
    small = argparse.Namespace(**{**vars(args), "tokens": 2 * args.batch, "k": 4})
    fn, hidden, weight = _prepare(args.method, small, 256)
    fn(hidden, weight).backward()  # first-call costs (kernels, thread pools)
    fn, hidden, weight = _prepare(args.method, args, args.vocab)
    limit = _status_kib("VmSize") * 1024 + int(args.mem_budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    record = {"bench": "head_loss", "method": args.method, **_shape(args, args.vocab)}
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _status_kib("VmRSS")
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(hidden, weight).backward()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    except (RuntimeError, MemoryError) as err:
        record["skipped"] = f"needs over --mem-budget-gib={args.mem_budget_gib}: {str(err)[:60]}"
        print(json.dumps(record), flush=True)
        return
    extra = (_status_kib("VmHWM") - before) / 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight)) / 2**20
    logits = hidden.shape[0] * hidden.shape[1] * args.vocab * 4 / 2**20
    record |= {"cpu_seconds": round(cpu_seconds, 2), "seconds": round(seconds, 2),
               "peak_extra_mib": round(extra, 1),
               "peak_extra_beyond_grads_mib": round(extra - grads, 1),
               "grads_mib": round(grads, 1), "fp32_logits_mib": round(logits, 1)}  # fmt: skip
    print(json.dumps(record), flush=True)


def _shape(args: argparse.Namespace, vocab: int) -> dict:
    return {"tokens": args.tokens, "vocab": vocab, "hidden": args.hidden, "k": args.k,
            "threads": args.threads}  # fmt: skip


def main() -> None:
    """Spawn one child per (round, vocabulary, method); print their lines and the summaries."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="S·B token positions")
    parser.add_argument("--batch", type=int, default=2, help="B (S = tokens / B)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--k", type=int, default=64, help="teacher support size")
    parser.add_argument("--reps", type=int, default=2, help="rounds (median time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--mem-budget-gib", type=float, default=10.0, help="per child")
    parser.add_argument("--child", dest="method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        args.vocab = args.vocab[0]
        child(args)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    records: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.reps):
        for vocab in args.vocab:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", method, "--vocab", str(vocab),
                       "--tokens", str(args.tokens), "--batch", str(args.batch),
                       "--hidden", str(args.hidden), "--k", str(args.k),
                       "--threads", str(args.threads), "--mem-budget-gib", str(args.mem_budget_gib)]  # fmt: skip
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                line = [x for x in out.splitlines() if x.startswith("{")][-1]
                print(line, flush=True)
                records.setdefault((vocab, method), []).append(json.loads(line))
    for vocab in args.vocab:
        summary = {"bench": "head_loss_summary", **_shape(args, vocab)}
        ran = {m: r for (v, m), r in records.items() if v == vocab and "seconds" in r[0]}
        cpu = {m: statistics.median(r["cpu_seconds"] for r in runs) for m, runs in ran.items()}
        base = ran.get("unfused")
        for method, runs in ran.items():
            summary[f"cpu_seconds_{method}"] = round(cpu[method], 2)
            summary[f"peak_extra_mib_{method}"] = runs[0]["peak_extra_mib"]
            if base and method != "unfused":
                summary[f"time_ratio_{method}"] = round(cpu[method] / cpu["unfused"], 3)
                for key in ("peak_extra_mib", "peak_extra_beyond_grads_mib"):
                    ratio = runs[0][key] / max(base[0][key], 1e-9)
                    summary[f"{key.replace('_mib', '')}_ratio_{method}"] = round(ratio, 3)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
