"""Every committed recipe loads as what it is (teacher, student or build); a build's
`recipe = "<file>"` sections resolve to exactly what those files say; no two recipes publish
different models under one name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from compression.build import load_build_recipe
from compression.configs import StudentRecipe, TeacherRecipe, load_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.toml"))  # top level and any subfolders


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
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


def _load(path: Path) -> object:
    raw = tomllib.loads(path.read_text())
    if "family" in raw:
        return load_build_recipe(path)
    return load_recipe(str(path), StudentRecipe if "teacher" in raw else TeacherRecipe)


def test_recipes_were_found() -> None:
    assert len(RECIPES) > 10 and any(p.name == "beauty.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_build_references_resolve_to_the_referenced_recipe(path: Path) -> None:
    raw = tomllib.loads(path.read_text())
    if "family" not in raw:
        return
    build = load_build_recipe(path)
    if "recipe" in raw.get("teacher", {}):
        ref = load_recipe(str(path.parent / raw["teacher"]["recipe"]), TeacherRecipe)
        assert (build.teacher.name, build.teacher.model, build.teacher.train, build.data) == (
            ref.name,
            ref.model,
            ref.train,
            ref.data,
        )
    for entry, step in zip(raw.get("students", []), build.students, strict=True):
        if "recipe" not in entry:
            continue
        ref = load_recipe(str(path.parent / entry["recipe"]), StudentRecipe)
        distill = None if entry.get("labels_only") else ref.distill
        assert step.name == entry.get("name", ref.name)
        assert (step.model, step.train, step.distill, step.init) == (
            ref.model,
            ref.train,
            distill,
            ref.init,
        )


def _published_settings() -> dict[str, dict[str, tuple[str, object]]]:
    """name -> {recipe file: the settings it publishes that name with} for every teacher and
    student any recipe makes (the teacher's version left out: builds use their own)."""
    out: dict[str, dict[str, tuple[str, object]]] = {}

    def add(name: str, where: Path, settings: object) -> None:
        out.setdefault(name, {})[str(where.relative_to(RECIPES_DIR))] = settings  # type: ignore[assignment]

    for path in RECIPES:
        recipe = _load(path)
        if isinstance(recipe, TeacherRecipe):
            add(recipe.name, path, ("teacher", (recipe.model, recipe.train, recipe.data)))
        elif isinstance(recipe, StudentRecipe):
            settings = (recipe.model, recipe.train, recipe.distill, recipe.init)
            add(recipe.name, path, ("student", settings))
        else:
            t = recipe.teacher  # type: ignore[attr-defined]
            name = t.name or f"{recipe.family}-teacher"  # type: ignore[attr-defined]
            add(name, path, ("teacher", (t.model, t.train, recipe.data)))  # type: ignore[attr-defined]
            for s in recipe.students:  # type: ignore[attr-defined]
                add(s.name, path, ("student", (s.model, s.train, s.distill, s.init)))
    return out


def test_no_two_recipes_publish_different_models_under_one_name() -> None:
    # beauty.toml's "beauty-student" once differed from recipes/beauty-student.toml (alpha,
    # temperature, beta, top_k, time limit) while a comment said they were the same.
    clashes = {
        name: sorted(by_file)
        for name, by_file in _published_settings().items()
        if len({repr(v) for v in by_file.values()}) > 1
    }
    assert not clashes, f"one name, different settings: {clashes}"


def test_partial_sameness_claims_in_student_comments_hold() -> None:
    windows = load_recipe(str(RECIPES_DIR / "ml1m-student-windows.toml"), StudentRecipe)
    # "Same teacher, loss, budget (30 minutes, one thread) and data as ml1m-student-windows"
    for name in ("ml1m-student-wide", "ml1m-student-deep"):
        r = load_recipe(str(RECIPES_DIR / f"{name}.toml"), StudentRecipe)
        assert (r.teacher, r.distill, r.train) == (windows.teacher, windows.distill, windows.train)
    # "Same student, data, budget and thread count as the fixed run"
    for name in ("ml1m-student-windows-plateau", "ml1m-student-windows-reliability"):
        r = load_recipe(str(RECIPES_DIR / f"{name}.toml"), StudentRecipe)
        assert (r.teacher, r.model, r.train) == (windows.teacher, windows.model, windows.train)


TEACHER = 'name = "t"\n[data]\npath = "synthetic"\n[model]\nhidden = 8\n'
STUDENT = 'name = "s"\nteacher = "t@1"\n[model]\nhidden = 8\n[distill]\nalpha = 0.9\n'


def _build(tmp_path: Path, body: str) -> Path:
    (tmp_path / "t.toml").write_text(TEACHER)
    (tmp_path / "s.toml").write_text(STUDENT)
    path = tmp_path / "b.toml"
    path.write_text('family = "b"\n[data]\npath = "synthetic"\n' + body)
    return path


def test_a_build_reads_referenced_recipes_relative_to_itself(tmp_path: Path) -> None:
    body = (
        '[teacher]\nrecipe = "t.toml"\n[[students]]\nrecipe = "s.toml"\n'
        '[[students]]\nrecipe = "s.toml"\nlabels_only = true\nname = "s-labels"\n'
    )
    recipe = load_build_recipe(_build(tmp_path, body))
    assert recipe.teacher.name == "t" and recipe.teacher.model == {"hidden": 8}
    plain, labels = recipe.students
    assert plain.name == "s" and plain.distill is not None and plain.distill.alpha == 0.9
    assert labels.name == "s-labels" and labels.distill is None and labels.model == plain.model


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[teacher]\nrecipe = "nope.toml"\n', r"teacher\.recipe: .*nope\.toml: recipe not found"),
        ('[teacher]\nrecipe = "t.toml"\nmodel = { hidden = 16 }\n', "remove model"),
        ("[teacher]\nrecipe = 3\n", "expected a path"),
        ('[teacher]\nrecipe = "s.toml"\n', "teacher.recipe: .*s.toml: teacher"),
        (
            '[teacher]\nrecipe = "t.toml"\n[[students]]\nrecipe = "missing.toml"\n',
            r"students\.0\.recipe: .*missing\.toml: recipe not found",
        ),
        (
            '[teacher]\nrecipe = "t.toml"\n[[students]]\nrecipe = "s.toml"\ntrain = { lr = 0.1 }\n',
            "students.0: .*remove train",
        ),
        (
            '[teacher]\nrecipe = "t.toml"\n[[students]]\nrecipe = "s.toml"\nlabels_only = 1\n',
            "labels_only: expected true or false",
        ),
        # the referenced student distils another teacher than this build's
        ('[teacher]\nname = "u"\n[[students]]\nrecipe = "s.toml"\n', "teacher 't@1'.*'u'"),
    ],
)
def test_bad_references_name_the_section_and_the_fix(
    tmp_path: Path, body: str, message: str
) -> None:
    path = _build(tmp_path, body)
    with pytest.raises(ValueError, match=message) as info:
        load_build_recipe(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_a_referenced_teacher_must_read_the_builds_data(tmp_path: Path) -> None:
    path = _build(tmp_path, '[teacher]\nrecipe = "t.toml"\n')
    path.write_text(path.read_text().replace('path = "synthetic"', 'path = "other.txt"'))
    with pytest.raises(ValueError, match=r"teacher\.recipe reads data"):
        load_build_recipe(path)
