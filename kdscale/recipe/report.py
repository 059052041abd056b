"""The ``report`` stage: every model of the recipe on the same held-out tokens, side by side.

Rows (those the recipe made): the teacher, the pruned student before distillation, the
distilled student and the student trained with the LM loss only (``baseline``: same init,
tokens and steps). Columns: parameters, held-out LM loss, perplexity, KL to the teacher where
the eval split is cached. Writes ``report.json``, ``report.md`` (the printed table) and
``curves.png`` (training and held-out loss per step of the trained runs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from kdscale.config import KDScaleConfig
from kdscale.io import atomic_write_bytes, atomic_write_text
from kdscale.logging import get_logger
from kdscale.recipe.layout import baseline_dir, pruned_model_dir, report_dir, teacher_dir

log = get_logger(__name__)


def _models(cfg: KDScaleConfig) -> list[tuple[str, Path]]:
    stages = cfg.recipe.stages
    rows = []
    if "teacher" in stages:
        rows.append(("teacher", teacher_dir(cfg)))
    if "prune" in stages:
        rows.append(("pruned, before distillation", pruned_model_dir(cfg)))
    if "train" in stages:
        distilled = cfg.train.cache or any(s.cache for s in cfg.train.sources)
        rows.append(("distilled student" if distilled else "student", Path(cfg.train.out)))
    if "baseline" in stages:
        rows.append(("student, LM loss only (no KD)", baseline_dir(cfg)))
    return rows


def _eval_limit(cfg: KDScaleConfig) -> int | None:
    """Held-out samples evaluated: ``train.eval_batches`` global batches, as in training (None:
    all of them)."""
    if cfg.train.eval_batches is None:
        return None
    return cfg.train.eval_batches * cfg.train.global_batch


def _held_out(cfg: KDScaleConfig) -> dict[str, tuple[str, str | None]]:
    """Source name → (tokens, cache) of the held-out data: ``""`` → train.tokens, or every
    source of a blend."""
    if not cfg.train.sources:
        return {"": (cfg.train.tokens, cfg.train.cache)}
    return {s.name: (s.tokens, s.cache) for s in cfg.train.sources}


def evaluate_models(cfg: KDScaleConfig) -> list[dict[str, Any]]:
    """Held-out metrics of every model of the recipe, on the same samples (one rank); a blend's
    over all its sources' held-out tokens, with each source's under ``sources``."""
    from kdscale.models import count_parameters
    from kdscale.models.checkpoints import read_model_config, read_train_state, resolve_checkpoint
    from kdscale.train import EvalResult, evaluate_model

    rows = []
    for label, path in _models(cfg):
        ckpt = resolve_checkpoint(path, label)
        results = {
            name: evaluate_model(
                ckpt, tokens, cache_dir=cache, cache_required=False, loss=cfg.loss,
                limit=_eval_limit(cfg), micro_batch=cfg.train.micro_batch,
                verify=cfg.integrity.verify_checksums,
            )  # fmt: skip
            for name, (tokens, cache) in _held_out(cfg).items()
        }
        overall = results[""] if "" in results else EvalResult.combine(list(results.values()))
        rows.append({"model": label, "path": str(path), "step": read_train_state(ckpt)["step"],
                     "parameters": count_parameters(read_model_config(ckpt)),
                     **overall.as_dict()})  # fmt: skip
        if cfg.train.sources:
            rows[-1]["sources"] = {name: result.as_dict() for name, result in results.items()}
        log.info("%s: %s", label, json.dumps(rows[-1]))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| model | parameters | steps | held-out LM loss | perplexity "
        "| KL to teacher (top-k + tail) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kl = f"{row['kl_teacher_tail']:.3f}" if "kl_teacher_tail" in row else "–"
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e6:.1f}M | {row['step']} | "
            f"{row['lm_loss']:.3f} | {row['ppl']:.1f} | {kl} |"
        )
    return "\n".join(lines)


def _curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {"loss/lm": [], "eval/lm_loss": []}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        for key, points in series.items():
            if key in record:
                points.append((record["step"], record[key]))
    return series


def curves_png(cfg: KDScaleConfig, rows: list[dict[str, Any]]) -> bytes:
    """Training LM loss and held-out LM loss per step of the trained runs, with the teacher's
    and the pruned model's held-out loss as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for row in rows:
        path = Path(row["path"])
        if not (path / "metrics.jsonl").is_file():  # teacher, pruned: one held-out figure
            style = "--" if row["model"] == "teacher" else ":"
            eval_ax.axhline(row["lm_loss"], linestyle=style, color="grey", label=row["model"])
            continue
        series = _curves(path)
        for ax, key in ((train_ax, "loss/lm"), (eval_ax, "eval/lm_loss")):
            if series[key]:
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="." if ax is eval_ax else None, label=row["model"])
    train_ax.set(title="training LM loss", xlabel="step", ylabel="nats/token")
    eval_ax.set(title="held-out LM loss", xlabel="step")
    train_ax.legend(fontsize=8)
    eval_ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    fig.suptitle(f"{cfg.recipe.name or 'recipe'}: distillation vs LM loss only")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_report(cfg: KDScaleConfig) -> list[dict[str, Any]]:
    """Evaluate, write report.json / report.md / curves.png, print the table."""
    rows = evaluate_models(cfg)
    table = format_table(rows)
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "curves.png", curves_png(cfg, rows))
    atomic_write_text(out / "report.md", table + "\n")
    atomic_write_text(out / "report.json", json.dumps({"rows": rows}, indent=2) + "\n")
    print(table, flush=True)
    by_name = {row["model"]: row for row in rows}
    kd, lm_only = by_name.get("distilled student"), by_name.get("student, LM loss only (no KD)")
    if kd and lm_only:
        gain = lm_only["lm_loss"] - kd["lm_loss"]
        print(f"distillation vs LM loss only, same student, tokens and steps: held-out LM loss "
              f"{kd['lm_loss']:.3f} vs {lm_only['lm_loss']:.3f} ({gain:+.3f} nats in favour of "
              "distillation)", flush=True)  # fmt: skip
    print(f"curves: {out / 'curves.png'}", flush=True)
    return rows
