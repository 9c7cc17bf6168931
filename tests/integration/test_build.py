"""`recsys build`: a whole family from one recipe, and a rerun that reuses every step."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from compression.build import BuildRecipe, load_build_recipe, run_build
from model_store.store import ModelStore

RECIPE = """
family = "tiny"
fp16 = ["tiny-teacher"]
context = [{ source = "tiny-student-int8-dynamic", max_len = 4 }]
[data]
path = "synthetic:users=200,items=50,max_len=12,min_len=5,seed=4"
[teacher]
model = { hidden = 32, max_len = 12, n_heads = 2 }
train = { max_epochs = 3, lr = 0.005 }
[[students]]
name = "tiny-student"
model = { hidden = 16, emb_dim = 8, max_len = 8, n_blocks = 1 }
train = { max_epochs = 2, lr = 0.005 }
distill = { alpha = 1.0, temperature = 1.0 }
[[quantize]]
source = "tiny-student"
item_matrix = true
config = { mode = "dynamic" }
[[prune]]
source = "tiny-teacher"
config = { heads_keep = 1, fine_tune_epochs = 1 }
[[int4]]
source = "tiny-student"
[[int4]]
source = "tiny-student"
block_size = 16
qat_epochs = 1
"""


def _count_calls(monkeypatch: pytest.MonkeyPatch, where: str, name: str) -> list[int]:
    """Wrap `<where>.<name>` wherever a compression module imported it."""
    original, calls = getattr(importlib.import_module(where), name), []

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    for module in list(sys.modules.values()):
        if module.__name__.startswith("compression") and getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, counted)
    return calls


def test_build_publishes_the_family_and_a_rerun_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import compression.pipeline
    import compression.report.compare
    import compression.variants  # noqa: F401 (imported so their names can be wrapped)

    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    recipe = load_build_recipe(path)
    store = ModelStore(tmp_path / "store")
    loads = _count_calls(monkeypatch, "compression.data.load", "load_dataset")
    splits = _count_calls(monkeypatch, "compression.data.sequences", "leave_one_out")
    import model_store.store as store_module

    checked: list[tuple[str, int]] = []
    real_verify = store_module._verify

    def verify(manifest, folder):  # type: ignore[no-untyped-def]
        checked.append((manifest.name, manifest.version))
        return real_verify(manifest, folder)

    monkeypatch.setattr(store_module, "_verify", verify)
    built = run_build(recipe, store, progress=False, log=lambda _: None)
    # Eight models from one read and one split of the data set; each parent checked once.
    assert (len(loads), len(splits)) == (1, 1)
    assert checked and len(checked) == len(set(checked)), checked
    assert set(built) == {"tiny-teacher", "tiny-student", "tiny-student-int8-dynamic",
                          "tiny-teacher-pruned", "tiny-teacher-fp16",
                          "tiny-student-int8-dynamic-ctx4", "tiny-student-int4",
                          "tiny-student-qat-int4-b16"}  # fmt: skip
    int4, qat = built["tiny-student-int4"], built["tiny-student-qat-int4-b16"]
    assert int4.parent == "tiny-student@1" and int4.artifacts["model.onnx"].precision == "int4"
    assert int4.recipe["int4"] == {"block_size": None} and int4.recipe["int4_matmuls"] > 0
    assert qat.parent == "tiny-student-qat-b16@1" and qat.recipe["int4"] == {"block_size": 16}
    tuned, _ = store.load("tiny-student-qat-b16@1")
    assert tuned.parent == "tiny-student@1" and tuned.recipe["qat"]["epochs"] == 1
    assert qat.metrics["test_ndcg@10"] > 0.0 and qat.metrics["teacher_test_ndcg@10"] > 0
    ctx = built["tiny-student-int8-dynamic-ctx4"]
    assert ctx.architecture["max_len"] == 4 and ctx.artifacts["model.onnx"].precision == "int8"
    assert ctx.parent == "tiny-student-int8-dynamic@1" and ctx.recipe["context"] == 4
    assert any("truncated to the last 4" in change for change in ctx.recipe["compact"])
    assert built["tiny-student"].parent == "tiny-teacher@1"
    assert built["tiny-student-int8-dynamic"].parent == "tiny-student@1"
    assert built["tiny-teacher-pruned"].architecture["n_heads"] == 1
    versions = {name: store.versions(name) for name in store.names()}
    logs: list[str] = []
    again = run_build(recipe, store, progress=False, log=logs.append)
    assert {n: m.version for n, m in again.items()} == {n: m.version for n, m in built.items()}
    assert {name: store.versions(name) for name in store.names()} == versions
    assert sum("reusing" in line for line in logs) == 8
    # Another fine-tune length is another model: trained again, not reused.
    path.write_text(RECIPE.replace("qat_epochs = 1", "qat_epochs = 2"))
    third = run_build(load_build_recipe(path), store, progress=False, log=lambda _: None)
    assert third["tiny-student-qat-int4-b16"].version == 2
    assert third["tiny-student-int4"].version == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('family = "x"\n[[quantize]]\nsource = "x-teacher"\nconfig = { mode = "fast" }\n', "mode"),
        ('family = "x"\n[[prune]]\nsource = "a"\nconfig = { heads = 1 }\n', "heads"),
        ('family = "X Y"\n', "family"),
        ('family = "x"\nstudents = 3\n', "students"),
    ],
)
def test_bad_build_recipes_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_build_recipe(path)


def test_a_step_with_an_unknown_source_is_refused(tmp_path: Path) -> None:
    recipe = BuildRecipe(
        family="tiny", data={"path": "synthetic:users=100,items=30,max_len=8,min_len=4"},
        teacher={"model": {"hidden": 8, "max_len": 8}, "train": {"max_epochs": 1}},
        quantize=[{"source": "nobody", "config": {"mode": "dynamic"}}],
    )  # fmt: skip
    with pytest.raises(ValueError, match="'nobody' is not a model of this build"):
        run_build(recipe, ModelStore(tmp_path / "s"), progress=False, log=lambda _: None)


def test_a_checkpoint_only_teacher_is_exported_once_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    teacher_only = RECIPE.split("[[students]]")[0].replace(
        'context = [{ source = "tiny-student-int8-dynamic", max_len = 4 }]', ""
    )
    path.write_text(teacher_only)  # teacher (and fp16) only
    recipe = load_build_recipe(path)
    store = ModelStore(tmp_path / "store")
    first = run_build(recipe, store, progress=False, log=lambda _: None)["tiny-teacher"]
    _, folder = store.load("tiny-teacher@1")
    legacy = store.publish(  # the same training run, as published before ONNX export existed
        "tiny-teacher", {n: folder / n for n in ("model.safetensors", "items.json")},
        kind="teacher", parent=None, architecture=first.architecture, recipe=first.recipe,
        dataset=first.dataset, metrics=first.metrics,
    )  # fmt: skip
    second = run_build(recipe, store, progress=False, log=lambda _: None)["tiny-teacher"]
    assert second.recipe["exported_from"] == f"tiny-teacher@{legacy.version}"
    assert "model.onnx" in second.artifacts
    third = run_build(recipe, store, progress=False, log=lambda _: None)["tiny-teacher"]
    assert third.version == second.version  # the export is reused, not repeated


def test_a_teacher_stored_before_a_newer_setting_existed_is_still_reused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    teacher_only = RECIPE.split("[[students]]")[0].split("[data]")[1]
    path.write_text(f'family = "tiny"\n[data]{teacher_only}')
    recipe = load_build_recipe(path)
    store = ModelStore(tmp_path / "store")
    first = run_build(recipe, store, progress=False, log=lambda _: None)["tiny-teacher"]
    _, folder = store.load(f"tiny-teacher@{first.version}")
    old_train = {k: v for k, v in first.recipe["train"].items() if k != "windows"}
    older = store.publish(  # as written before TrainConfig had `windows` (default "last")
        "tiny-teacher", {name: folder / name for name in first.artifacts},
        kind="teacher", parent=None, architecture=first.architecture,
        recipe={**first.recipe, "train": old_train}, dataset=first.dataset,
        metrics=first.metrics,
    )  # fmt: skip
    logs: list[str] = []
    again = run_build(recipe, store, progress=False, log=logs.append)["tiny-teacher"]
    assert again.version == older.version
    assert any("reusing" in line for line in logs)


def test_a_family_exported_by_pytorch_is_upgraded_without_training_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx

    import compression.build
    import compression.export.exporter
    import compression.variants
    from compression.export.graph import PRODUCER

    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    recipe = load_build_recipe(path)
    store = ModelStore(tmp_path / "store")
    real = compression.export.exporter.export_onnx

    def torch_export(model: object, out: Path, writer: str = "graph") -> None:
        real(model, out, writer="torch")  # type: ignore[arg-type]

    # a store built before the graph writer existed (and before builds looked at the writer)
    for module in (compression.export.exporter, compression.variants):
        monkeypatch.setattr(module, "export_onnx", torch_export)
    monkeypatch.setattr(compression.build, "_graph_is_current", lambda store, m: True)
    old = run_build(recipe, store, progress=False, log=lambda _: None)
    monkeypatch.undo()

    def producer(m: object) -> str:
        _, folder = store.resolve(f"{m.name}@{m.version}")  # type: ignore[attr-defined]
        return onnx.load(str(folder / "model.onnx")).producer_name

    assert producer(old["tiny-teacher"]) == "pytorch"
    logs: list[str] = []
    new = run_build(recipe, store, progress=False, log=logs.append)
    for name in ("tiny-teacher", "tiny-student", "tiny-teacher-pruned"):  # same weights
        assert new[name].recipe["exported_from"] == f"{name}@{old[name].version}"
        assert producer(new[name]) == PRODUCER
        assert new[name].metrics["test_ndcg@10"] == old[name].metrics["test_ndcg@10"]
    assert any("tiny-teacher-pruned: reusing" in line for line in logs)  # no new fine-tune
    assert any("tiny-student: reusing" in line for line in logs)  # no new distillation
    # variants made from a graph are made again from the new one
    student = new["tiny-student"]
    assert new["tiny-student-int8-dynamic"].parent == f"tiny-student@{student.version}"
    assert new["tiny-teacher-fp16"].parent == f"tiny-teacher@{new['tiny-teacher'].version}"
    again = run_build(recipe, store, progress=False, log=lambda _: None)
    assert {n: m.version for n, m in again.items()} == {n: m.version for n, m in new.items()}
