"""Every committed recipe loads as what it is (teacher, student or build); a build's
`recipe = "<file>"` sections resolve to exactly what those files say; no two recipes publish
different models under one name."""

from __future__ import annotations

import re
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
    experiments = RECIPES_DIR / "experiments"
    windows = load_recipe(str(experiments / "ml1m-student-windows.toml"), StudentRecipe)
    # "Same teacher, loss, budget (30 minutes, one thread) and data as ml1m-student-windows"
    for name in ("ml1m-student-wide", "ml1m-student-deep"):
        r = load_recipe(str(experiments / f"{name}.toml"), StudentRecipe)
        assert (r.teacher, r.distill, r.train) == (windows.teacher, windows.distill, windows.train)
    # "Same student, data, budget and thread count as the fixed run"
    for name in ("ml1m-student-windows-plateau", "ml1m-student-windows-reliability"):
        r = load_recipe(str(experiments / f"{name}.toml"), StudentRecipe)
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


# What a user starts from: one build recipe per data set (ML-1M, Beauty, your own CSV) and the
# standalone recipes they reference; every ablation and rerun lives in recipes/experiments/.
TOP_LEVEL = sorted(RECIPES_DIR.glob("*.toml"))
TOP_BUILDS = [p for p in TOP_LEVEL if "family" in tomllib.loads(p.read_text())]


def test_the_top_level_holds_only_what_a_user_starts_from() -> None:
    assert len(TOP_LEVEL) <= 10, [p.name for p in TOP_LEVEL]
    assert {"ml1m.toml", "beauty.toml", "your-data.toml"} <= {p.name for p in TOP_BUILDS}
    # every top-level standalone recipe is there because a top-level build reads it
    referenced = set()
    for path in TOP_BUILDS:
        raw = tomllib.loads(path.read_text())
        for section in [raw.get("teacher", {}), *raw.get("students", [])]:
            if "recipe" in section:
                target = (path.parent / section["recipe"]).resolve()
                assert target.is_file(), f"{path.name}: {section['recipe']} does not exist"
                assert target.parent == RECIPES_DIR, f"{path.name} reads {target} (not top level)"
                referenced.add(target.name)
    loose = {p.name for p in TOP_LEVEL} - {p.name for p in TOP_BUILDS} - referenced
    assert not loose, f"top-level recipes no top-level build reads: {sorted(loose)}"


def test_the_ml1m_build_makes_the_best_known_family() -> None:
    recipe = load_build_recipe(RECIPES_DIR / "ml1m.toml")
    (student,) = [s for s in recipe.students if s.name == "ml1m-student"]
    # The 3/16 student of the headline, on an epoch budget (no seconds limit).
    assert student.model == {**student.model, "emb_dim": 24, "hidden": 48, "successors": 2}
    assert student.train.time_limit_s is None and recipe.teacher.train.time_limit_s is None
    served = [q for q in recipe.quantize if q.source == "ml1m-student"]
    assert served and served[0].item_matrix


def _fake_manifest(name: str, kind: str, parent: str | None) -> object:
    from model_store.manifest import Manifest

    return Manifest.model_construct(
        name=name, version=1, kind=kind, parent=parent, recipe={}, artifacts={"model.onnx": {}}
    )


@pytest.mark.parametrize("path", TOP_BUILDS, ids=[p.name for p in TOP_BUILDS])
def test_a_top_level_build_plans_every_step_without_training(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recsys build`'s own path (load the recipe, then run_build over an empty store) with
    training, distillation and every variant maker replaced by stubs that check their inputs:
    each model config is valid for a real catalogue size, each step's source exists when the
    step runs, and no two steps publish one name."""
    import types

    from compression import pipeline, variants
    from compression.build import run_build
    from model_store.store import ModelStore

    made: list[str] = []

    def record(name: str, kind: str, parent: str | None) -> object:
        assert name not in made, f"{path.name}: two steps publish {name}"
        made.append(name)
        return _fake_manifest(name, kind, parent)

    def train_teacher(recipe, store, progress, log):  # type: ignore[no-untyped-def]
        recipe.model_config_for(3416)  # ML-1M's catalogue; raises on a size that does not fit
        return types.SimpleNamespace(manifest=record(recipe.name, "teacher", None))

    def distill_student(recipe, store, progress, log):  # type: ignore[no-untyped-def]
        recipe.model_config_for(3416)
        return types.SimpleNamespace(manifest=record(recipe.name, "student", recipe.teacher))

    def variant(kind: str):  # type: ignore[no-untyped-def]
        def make(store, parent, *args, name, **kwargs):  # type: ignore[no-untyped-def]
            return record(name, kind, parent)

        return make

    monkeypatch.setattr(pipeline, "train_teacher", train_teacher)
    monkeypatch.setattr(pipeline, "distill_student", distill_student)
    for maker in ("quantize_variant", "prune_variant", "fp16_variant", "context_variant"):
        monkeypatch.setattr(variants, maker, variant(maker.removesuffix("_variant")))
    recipe = load_build_recipe(path)
    built = run_build(recipe, ModelStore(tmp_path / "store"), progress=False, log=lambda _: None)
    assert sorted(built) == sorted(made)
    expected = 1 + len(recipe.students) + len(recipe.quantize) + len(recipe.prune)
    assert len(made) == expected + len(recipe.fp16) + len(recipe.context)


def test_the_experiments_index_names_every_experiment() -> None:
    folder = RECIPES_DIR / "experiments"
    index = (folder / "README.md").read_text()
    listed = set(re.findall(r"`([a-z0-9][a-z0-9._-]*\.toml)`", index))
    present = {p.name for p in folder.glob("*.toml")}
    assert present <= listed, f"not in recipes/experiments/README.md: {sorted(present - listed)}"
    assert listed <= present | {p.name for p in TOP_LEVEL}, sorted(listed - present)
