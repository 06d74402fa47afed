"""The recipes that ship in recipes/ pass the recipe checker: every key and value valid. The demo's
resolves completely; the others name weights or a first-stage run that a user provides, so the only error
they may give is that path not being there."""

from __future__ import annotations

from pathlib import Path

import pytest

from lavin_edge.training.config import load_recipe
from lavin_edge.training.recipe import RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def test_recipes_folder_holds_the_demo() -> None:
    assert "demo.toml" in {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_is_valid(path: Path) -> None:
    try:
        cfg = load_recipe(path, {})
    except RecipeError as e:
        msg = str(e)
        assert path.name != "demo.toml", msg
        # A user-provided path, reported with its line: nothing else may be wrong with the recipe.
        assert msg.startswith(f"{path}:") and ("not found" in msg or "no adapters.safetensors" in msg), msg
        return
    assert cfg.data, f"{path.name} trains on no data"
