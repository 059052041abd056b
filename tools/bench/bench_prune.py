"""Benchmark `kdscale prune` on the SmolLM2-135M fixture: time, and loss of ranked vs random cuts.

    .venv/bin/python tools/bench/bench_prune.py                         # ~50% of the parameters
    .venv/bin/python tools/bench/bench_prune.py --samples 64 --seq-len 256 --layers 20

Imports the fixture (`kdscale import-hf`), makes calibration and held-out token shards
(`kdscale data`, stdlib ``json`` package / ``textwrap.py``), prunes to the target with
importance ranking and with ``--random-seeds`` seeded random choices of the same shape, and
prints one JSON line per prune: wall seconds (and the stage's load/score/prune split), the
calibration loss before and after, and the held-out loss of the pruned model (`eval` split,
first ``--samples`` samples). A summary line gives the ratio of random to ranked held-out loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kdscale.cli import main as kdscale  # noqa: E402
from kdscale.config import load_config  # noqa: E402


def _held_out_loss(model_dir: Path, tokens: Path, samples: int, seq_len: int) -> float:
    from kdscale.models import build_gpt_model
    from kdscale.models.checkpoints import load_weights, open_model_dir
    from kdscale.models.parallel import parallel_session
    from kdscale.prune.importance import evaluate_loss
    from kdscale.prune.stage import calibration_samples

    import torch

    cfg = load_config(
        [],
        [
            f"prune.tokens={tokens}",
            "prune.split=eval",
            f"prune.calibration_samples={samples}",
            f"prune.calibration_seq_len={seq_len}",
        ],
    )
    ckpt, model = open_model_dir(model_dir, "model")
    batch = calibration_samples(cfg.prune, model.vocab_size)
    with parallel_session(cfg.parallel):
        gpt = build_gpt_model(model, cfg.parallel, pre_process=True, post_process=True).eval()
        load_weights(ckpt, [gpt])
        return evaluate_loss(
            gpt, [torch.from_numpy(batch[i : i + 4]) for i in range(0, len(batch), 4)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=32, help="calibration (and held-out) samples"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=480)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--random-seeds", type=int, default=2)
    args = parser.parse_args()
    from kdscale.hub import resolve_model_dir

    with tempfile.TemporaryDirectory(prefix="kdscale-bench-prune-") as tmp:
        root = Path(tmp)
        assert (
            kdscale(["import-hf", str(resolve_model_dir("smollm2-135m")), str(root / "model")]) == 0
        )
        assert (
            kdscale(
                [
                    "data",
                    "--input",
                    "stdlib:python/json",
                    "--eval-input",
                    "stdlib:python/textwrap.py",
                    "--seq-len",
                    str(args.seq_len),
                    "--out",
                    str(root / "tokens"),
                ]
            )
            == 0
        )
        target = [
            "--layers",
            str(args.layers),
            "--hidden",
            str(args.hidden),
            "--ffn",
            str(args.ffn),
            "--heads",
            str(args.heads),
            "--samples",
            str(args.samples),
        ]
        runs = [("importance", 0)] + [("random", seed) for seed in range(args.random_seeds)]
        held_out = {}
        for method, seed in runs:
            out = root / f"{method}-{seed}"
            started = time.perf_counter()
            assert (
                kdscale(
                    [
                        "prune",
                        "--model",
                        str(root / "model"),
                        "--tokens",
                        str(root / "tokens"),
                        "--out",
                        str(out),
                        *target,
                        "--set",
                        f"prune.method={method}",
                        "--set",
                        f"prune.seed={seed}",
                    ]
                )
                == 0
            )
            wall = time.perf_counter() - started
            report = json.loads((out / "importance.json").read_text())
            loss = _held_out_loss(out, root / "tokens", args.samples, args.seq_len)
            held_out.setdefault(method, []).append(loss)
            print(
                json.dumps(
                    {
                        "method": method,
                        "seed": seed,
                        "wall_s": round(wall, 2),
                        "stage_s": report["seconds"],
                        "params": report["parameters"],
                        "calibration": report["calibration"],
                        "loss_source": round(report["loss"]["source"], 4),
                        "loss_pruned": round(report["loss"]["pruned"], 4),
                        "held_out_loss_pruned": round(loss, 4),
                    }
                ),
                flush=True,
            )
        print(
            json.dumps(
                {
                    "summary": "held-out loss, random / importance",
                    "ratio": round(
                        statistics.mean(held_out["random"]) / held_out["importance"][0], 3
                    ),
                }
            )
        )


if __name__ == "__main__":
    main()
