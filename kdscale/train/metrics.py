"""Training metrics in one place: the FLOP count behind MFU, the cross-rank reduction, and the
sinks (console, ``metrics.jsonl``, W&B) that rank 0 writes to.

Metric names are namespaced (``loss/``, ``kd/``, ``optim/``, ``throughput/``, ``memory/``,
``eval/``). ``metrics.jsonl`` holds one JSON object per logged step, each step once: a resumed run
first drops the lines of steps after its checkpoint (logged before a crash, redone now).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from kdscale.config import ModelConfig
from kdscale.io import atomic_write_text
from kdscale.logging import get_logger
from kdscale.tracking import Tracker

log = get_logger(__name__)


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward, no recompute).

    Forward per token: 2 × (weights in every matmul: QKV, attention output, SwiGLU MLP, output
    layer) + attention scores and values, 2 × 2 × seq_len × heads × head width per layer
    (counted over the full square, as megatron-LM does).
    """
    h, heads, groups = model.hidden_size, model.num_attention_heads, model.num_query_groups
    kv = model.kv_channels or h // heads
    attention = h * (heads + 2 * groups) * kv + heads * kv * h
    mlp = 3 * h * model.ffn_hidden_size
    matmul = model.num_layers * (attention + mlp) + model.vocab_size * h
    scores = model.num_layers * 2 * seq_len * heads * kv
    return 3.0 * (2.0 * matmul + 2.0 * scores)


def max_memory_gib() -> float:
    """Peak memory of this process: allocated GPU memory, else the resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def reports_loss() -> bool:
    """Whether this rank contributes loss sums: the last pipeline stage, tensor rank 0
    (the other tensor ranks hold the same values), one per data-parallel replica."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def sum_to_all(values: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small float64 vector over every rank (one collective; a host sync)."""
    values = values.to(torch.float64)
    if torch.cuda.is_available():
        values = values.cuda()
    dist.all_reduce(values, op=op)
    return values.cpu()


class MetricsSink:
    """Console, ``metrics.jsonl`` and W&B, written by rank 0 only."""

    def __init__(self, out: Path, tracker: Tracker | None, resumed_step: int) -> None:
        self.enabled = dist.get_rank() == 0
        self.tracker = tracker
        self.path = out / "metrics.jsonl"
        if self.enabled and self.path.is_file():
            self._forget_after(resumed_step)

    def _forget_after(self, step: int) -> None:
        """Drop the lines of steps after ``step``: the run redoes them from its checkpoint."""
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            log.info("metrics.jsonl: dropping %d lines after step %d (redone)", len(lines) - len(kept), step)
            atomic_write_text(self.path, "".join(kept))

    def write(self, step: int, metrics: dict[str, float], line: str) -> None:
        """Log one step's metrics everywhere."""
        if not self.enabled:
            return
        log.info("step %d | %s", step, line)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}, allow_nan=True) + "\n")
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)

    def close(self) -> None:
        """Finish the W&B run."""
        if self.enabled and self.tracker is not None:
            self.tracker.finish()
            sys.stdout.flush()


def train_line(m: dict[str, float]) -> str:
    """The console summary of a training log step."""
    parts = [f"loss {m['loss/total']:.4f}", f"lm {m['loss/lm']:.4f}"]
    if "loss/kd" in m:
        parts += [
            f"kd {m['loss/kd']:.4f}",
            f"kl_teacher_tail {m['kd/kl_teacher_tail']:.4f}",
            f"cover {m['kd/covered_mass']:.3f}",
            f"α {m['kd/weight']:.2f}",
        ]
    parts += [
        f"lr {m['optim/lr']:.3g}",
        f"gnorm {m['optim/grad_norm']:.3f}",
        f"{m['throughput/tokens_per_s']:,.0f} tok/s",
        f"mfu {100 * m['throughput/mfu']:.2f}%",
        f"mem {m['memory/max_gib']:.2f} GiB",
    ]
    return " | ".join(parts)


def eval_line(m: dict[str, float]) -> str:
    """The console summary of an evaluation (and of each source's, for a blend)."""
    text = f"eval: {m['eval/tokens']:,.0f} tokens | lm {m['eval/lm_loss']:.4f}"
    text += f" | ppl {m['eval/ppl']:.2f}"
    if "eval/kl_teacher_tail" in m:
        text += f" | kl_teacher_tail {m['eval/kl_teacher_tail']:.4f} | kd {m['eval/kd_loss']:.4f}"
    for key in m:
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "lm_loss":
            name = parts[1]
            text += f" | {name}: lm {m[key]:.4f}"
            if f"eval/{name}/kl_teacher_tail" in m:
                text += f" kl_teacher_tail {m[f'eval/{name}/kl_teacher_tail']:.4f}"
    return text


def perplexity(lm_loss: float) -> float:
    """exp(lm_loss), inf when it overflows."""
    return math.exp(lm_loss) if lm_loss < 700 else math.inf
