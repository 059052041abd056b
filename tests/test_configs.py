"""Every shipped recipe in configs/ is valid against the schema (recipes are data, and tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdscale.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert RECIPES, "configs/ holds no recipes"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_validates(recipe: Path) -> None:
    cfg = load_config([str(recipe)])
    assert cfg.model_dump()  # every key known, every value allowed
