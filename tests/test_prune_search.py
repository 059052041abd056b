"""`kdscale prune --search`: candidate shapes under a budget, each pruned and briefly distilled.

Real parts: the tiny teacher as a model directory, token shards from `kdscale data`, and the real
`kdscale train` loop (LM loss, 2 steps per candidate) for the short distillation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdscale.cli import main
from kdscale.config import ModelConfig, ParallelConfig, PruneSearch
from kdscale.errors import KDScaleError
from kdscale.models import count_parameters
from kdscale.models.hf_io import import_hf
from kdscale.prune.search import candidate_shapes

SOURCE = ModelConfig(
    num_layers=10,
    hidden_size=256,
    ffn_hidden_size=768,
    num_attention_heads=8,
    num_query_groups=4,
    vocab_size=1024,
)


def test_candidates_respect_budget_limits_and_layout() -> None:
    budget = int(0.8 * count_parameters(SOURCE))
    search = PruneSearch(enabled=True, params=budget, top_k=50, width_step=64)
    shapes = candidate_shapes(SOURCE, search, ParallelConfig(tensor=2), world_size=2)
    assert 0 < len(shapes) <= 50
    sizes = [count_parameters(m) for m in shapes]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= budget
    for m in shapes:
        assert m.num_layers >= 8 and m.hidden_size >= 0.6 * 256 and m.ffn_hidden_size >= 0.6 * 768
        assert m.num_query_groups == 4 and m.num_attention_heads in (8, 4)  # 2 or 1 heads per group
        assert m.hidden_size % m.num_attention_heads == 0 and m.ffn_hidden_size % 2 == 0


def test_unreachable_budget_is_refused() -> None:
    with pytest.raises(KDScaleError, match="no candidate within prune.search.params=1000"):
        candidate_shapes(SOURCE, PruneSearch(enabled=True, params=1000), ParallelConfig(), 1)


def test_search_distills_candidates_and_marks_winner(
    tmp_path: Path, tiny_teacher_dir: Path, tiny_tokens_dir: Path
) -> None:
    model = import_hf(tiny_teacher_dir, tmp_path / "model")
    budget = count_parameters(model) - 5000  # forces hidden 32 → 24
    out = tmp_path / "search"
    status = main(
        [
            "prune",
            "--search",
            "--model",
            str(tmp_path / "model"),
            "--tokens",
            str(tiny_tokens_dir),
            "--out",
            str(out),
            "--samples",
            "8",
            "--set",
            f"prune.search.params={budget}",
            "--set",
            "prune.search.width_step=8",
            "--set",
            "prune.search.top_k=2",
            "--set",
            "prune.search.steps=2",
            "--set",
            f"train.tokens={tiny_tokens_dir}",
            "--set",
            "train.global_batch=4",
            "--set",
            "train.micro_batch=2",
            "--set",
            "wandb.enabled=false",
        ]
    )
    assert status == 0
    report = json.loads((out / "search.json").read_text())
    rows = report["candidates"]
    assert len(rows) == 2 and all(row["params"] <= budget for row in rows)
    assert {row["model"]["hidden_size"] for row in rows} == {24}
    assert report["winner"] == min(rows, key=lambda row: row["lm_loss"])["name"]
    for row in rows:
        assert (out / "candidates" / row["name"] / "run" / "checkpoints" / "latest").is_file()
    assert f"{report['winner']} **(winner)**" in (out / "search.md").read_text()
    winner = out / "candidates" / report["winner"] / "model"
    assert main(["export-hf", str(winner), str(tmp_path / "winner-hf")]) == 0
