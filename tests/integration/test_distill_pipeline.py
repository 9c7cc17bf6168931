"""Teacher -> distilled student and labels-only control, through the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from compression.configs import DistillConfig, StudentRecipe, TeacherRecipe
from compression.pipeline import distill_student, load_model_data, train_teacher
from model_store.store import ModelStore

DATA = "synthetic:users=300,items=60,max_len=16,min_len=6,seed=2"


@pytest.fixture(scope="module")
def store_with_teacher(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    recipe = TeacherRecipe(
        name="t",
        data={"path": DATA},
        model={"hidden": 32, "max_len": 16, "n_heads": 2},
        train={"max_epochs": 6, "lr": 5e-3},
    )
    train_teacher(recipe, store, progress=False, log=lambda _: None)
    return store


@pytest.mark.parametrize("strategy", ["fixed", "reliability", "plateau", None])
def test_student_is_published_with_parent_and_recipe(store_with_teacher, strategy) -> None:
    distill = None if strategy is None else DistillConfig(strategy=strategy, plateau_patience=1)
    recipe = StudentRecipe(
        name=f"s-{strategy or 'labels'}",
        teacher="t@latest",
        model={"hidden": 8, "emb_dim": 4, "max_len": 8, "n_blocks": 1},
        train={"max_epochs": 3, "lr": 5e-3},
        distill=distill,
    )
    report = distill_student(recipe, store_with_teacher, progress=False, log=lambda _: None)
    m = report.manifest
    assert m.parent == "t@1"
    assert m.kind == ("student" if strategy else "student-labels-only")
    assert m.architecture["emb_dim"] == 4 and m.architecture["max_len"] == 8
    assert m.recipe["distill"] == (None if distill is None else distill.model_dump())
    assert m.recipe["data"]["path"] == DATA  # evaluable on its own (`recsys evaluate`)
    assert load_model_data(m).sha256 == m.dataset.sha256
    assert 0 < m.metrics["params_ratio"] < 0.5
    assert m.metrics["ndcg_retention"] == pytest.approx(
        m.metrics["test_ndcg@10"] / m.metrics["teacher_test_ndcg@10"]
    )
    _, folder = store_with_teacher.load(f"{m.name}@latest")
    assert (Path(folder) / "model.safetensors").is_file()


def test_unknown_teacher_is_a_clear_error(store_with_teacher) -> None:
    recipe = StudentRecipe(name="s", teacher="nope@1", model={"hidden": 8})
    with pytest.raises(Exception, match="nope"):
        distill_student(recipe, store_with_teacher, progress=False, log=lambda _: None)


def test_a_short_context_copy_of_the_teacher_starts_from_its_weights(store_with_teacher) -> None:
    import torch

    from compression.model.train import load_checkpoint
    from compression.pipeline import warm_start

    _, folder = store_with_teacher.load("t@latest")
    teacher = load_checkpoint(Path(folder) / "model.safetensors")
    cfg = teacher.cfg.model_copy(update={"max_len": 6})
    copy = warm_start(teacher, cfg, "t@1").eval()
    short = torch.tensor([[0, 0, 5, 9, 3, 7]])  # fits both windows: identical scores
    with torch.inference_mode():
        torch.testing.assert_close(copy(short), teacher(short))
    for update, message in [({"hidden": 16}, "hidden=16 vs the teacher's 32"),
                            ({"max_len": 32}, "max_len=32 > the teacher's 16")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            warm_start(teacher, teacher.cfg.model_copy(update=update), "t@1")
    # and through a recipe: trained on from there, published like any student
    recipe = StudentRecipe(
        name="t-ctx6", teacher="t@latest", init="teacher",
        model={"hidden": 32, "max_len": 6, "n_heads": 2},
        train={"max_epochs": 1, "lr": 1e-4}, distill=DistillConfig(alpha=1.0, temperature=1.0),
    )  # fmt: skip
    m = distill_student(recipe, store_with_teacher, progress=False, log=lambda _: None).manifest
    assert m.recipe["init"] == "teacher" and m.architecture["max_len"] == 6
    assert 0.95 < m.metrics["params_ratio"] < 1.0  # the same model less 10 position rows


def test_a_student_with_a_sampled_loss_also_samples_its_distillation(store_with_teacher) -> None:
    recipe = StudentRecipe(
        name="s-sampled", teacher="t@latest",
        model={"hidden": 16, "emb_dim": 8, "max_len": 8, "n_blocks": 1},
        train={"max_epochs": 4, "lr": 5e-3, "loss": "sampled-uniform", "negatives": 16,
               "threads": 1},
        distill=DistillConfig(alpha=1.0, temperature=1.0, beta=0.5, top_k=8),
    )  # fmt: skip
    m = distill_student(recipe, store_with_teacher, progress=False, log=lambda _: None).manifest
    assert m.recipe["train"]["loss"] == "sampled-uniform"
    assert m.metrics["test_ndcg@10"] > m.metrics["popularity_test_ndcg@10"]


def test_top_k_students_of_a_stored_teacher_share_its_cached_targets(
    store_with_teacher, monkeypatch
) -> None:
    from compression.distill import targets_cache

    calls: list[int] = []
    real = targets_cache.teacher_targets

    def counted(*args: object, **kw: object) -> object:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(targets_cache, "teacher_targets", counted)
    cache = store_with_teacher.root.parent / ".teacher-cache"
    before = set(cache.iterdir()) if cache.is_dir() else set()
    for seed in (0, 1):  # two students, other seeds, the same teacher and targets
        recipe = StudentRecipe(
            name=f"s-top-k-{seed}", teacher="t@latest",
            model={"hidden": 8, "emb_dim": 4, "max_len": 8, "n_blocks": 1},
            train={"max_epochs": 1, "lr": 5e-3, "seed": seed},
            distill=DistillConfig(alpha=1.0, temperature=1.0, top_k=7),  # no other test's
        )  # fmt: skip
        distill_student(recipe, store_with_teacher, progress=False, log=lambda _: None)
    assert calls == [1] and len(set(cache.iterdir()) - before) == 1
    # Both published: no training state is left to resume.
    assert not list((store_with_teacher.root.parent / ".train-state").glob("s-top-k-*"))
