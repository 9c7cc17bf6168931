"""Every committed recipe loads as what it is (teacher, student or build)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from compression.build import load_build_recipe
from compression.configs import StudentRecipe, TeacherRecipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_is_valid(path: Path) -> None:
    raw = tomllib.loads(path.read_text())
    if "family" in raw:
        recipe = load_build_recipe(path)
        sources = {recipe.teacher.name or f"{recipe.family}-teacher"}
        sources |= {s.name for s in recipe.students}
        for step in [*recipe.quantize, *recipe.prune]:
            assert step.source in sources, f"{path.name}: unknown source {step.source}"
    elif "teacher" in raw:
        load_recipe(str(path), StudentRecipe)
    else:
        load_recipe(str(path), TeacherRecipe)
