"""Generated documentation matches the code it is generated from."""
from __future__ import annotations

from pathlib import Path

from tools.recipe_reference import render

REPO = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert page == render(), "docs/recipes.md is stale: python tools/recipe_reference.py --out docs/recipes.md"


def test_every_recipe_key_is_described():
    undocumented = [line for line in render().splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not undocumented, undocumented
