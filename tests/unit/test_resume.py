"""A run cut short continues where it stopped and ends with the weights of an uninterrupted
run; a changed recipe starts fresh; a published run leaves no state behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compression.configs import (
    DistillConfig,
    ModelConfig,
    StudentRecipe,
    TeacherRecipe,
    TrainConfig,
)
from compression.data.sequences import Split, leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.distill.loss import DistillLoss
from compression.model.resume import (
    STATE_FORMAT,
    ResumeAt,
    load_state,
    remove_states,
    save_state,
)
from compression.model.train import train
from compression.pipeline import distill_student, train_teacher
from model_store.store import ModelStore


class Cut(Exception):
    """Stands for the kill: raised from the log line of epoch `at`."""


def _split() -> Split:
    data = synthetic_dataset(SyntheticConfig(users=80, items=40, max_len=12, min_len=5))
    return leave_one_out(data)


SPLIT = _split()
CFG = ModelConfig(n_items=SPLIT.n_items, max_len=12, hidden=16, dropout=0.3)


def _train_cfg(**kw: object) -> TrainConfig:
    base = {"max_epochs": 4, "lr": 1e-2, "batch_size": 32, "threads": 1, "seed": 1}
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def _sampled() -> tuple[TrainConfig, object]:
    return _train_cfg(loss="sampled-popularity", negatives=8, ema_epochs=1.0), None


def _distilled() -> tuple[TrainConfig, object]:
    teacher = train(CFG, _train_cfg(max_epochs=2), SPLIT, progress=False, log=lambda _: None)
    # A temperature that cools after every validation (the teacher's NDCG is "reached" at
    # once): a resumed run must rebuild its cached targets at the cooled temperature.
    cfg = DistillConfig(alpha=0.7, temperature=4.0, beta=0.5, top_k=10, strategy="plateau")
    return _train_cfg(), DistillLoss(cfg, teacher.model, teacher_valid_ndcg=0.0)


def _run(
    train_cfg: TrainConfig, loss: object, folder: Path, cut_at: int | None = None
) -> tuple[object, list[str]]:
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if cut_at is not None and line.startswith(f"epoch {cut_at:3d}"):
            raise Cut

    result = train(
        CFG, train_cfg, SPLIT, loss_fn=loss, progress=False, log=log,  # type: ignore[arg-type]
        on_eval=getattr(loss, "on_eval", None), resume=ResumeAt(folder, "run", "k"),
    )  # fmt: skip
    return result, lines


@pytest.mark.parametrize("make", [_sampled, _distilled], ids=["sampled-ema", "distilled"])
def test_a_resumed_run_ends_with_the_uninterrupted_weights(make, tmp_path: Path) -> None:
    train_cfg, loss = make()
    straight, _ = _run(train_cfg, loss, tmp_path / "a")
    train_cfg, loss = make()
    with pytest.raises(Cut):
        _run(train_cfg, loss, tmp_path / "b", cut_at=3)
    assert len(list((tmp_path / "b").glob("run-*.pt"))) == 1
    train_cfg, loss = make()  # a new process: fresh loss, generators and schedule
    resumed, lines = _run(train_cfg, loss, tmp_path / "b")
    assert any(line.startswith("resuming after epoch 2 of 4") for line in lines)
    assert [line[:9] for line in lines if line.startswith("epoch")] == ["epoch   3", "epoch   4"]
    assert resumed.epochs_run == straight.epochs_run == 4
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    first, _ = _run(_train_cfg(max_epochs=2), None, tmp_path)
    again, lines = _run(_train_cfg(max_epochs=2), None, tmp_path)  # e.g. publishing failed
    assert not [line for line in lines if line.startswith("epoch")]
    assert again.epochs_run == 2 and again.best_valid == first.best_valid
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key


def test_a_changed_recipe_starts_fresh(tmp_path: Path) -> None:
    with pytest.raises(Cut):
        _run(_train_cfg(), None, tmp_path, cut_at=2)
    _, lines = _run(_train_cfg(lr=5e-3), None, tmp_path)
    assert not [line for line in lines if line.startswith("resuming")]
    assert next(line[:9] for line in lines if line.startswith("epoch")) == "epoch   1"
    # Speed settings are not what a run computes: it resumes with another thread count.
    with pytest.raises(Cut):
        _run(_train_cfg(lr=2e-3), None, tmp_path, cut_at=2)
    _, lines = _run(_train_cfg(lr=2e-3, threads=2, time_limit_s=100.0), None, tmp_path)
    assert any(line.startswith("resuming after epoch 1") for line in lines)


def test_an_unreadable_state_is_ignored_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(Cut):
        _run(_train_cfg(), None, tmp_path, cut_at=2)
    (state,) = tmp_path.glob("run-*.pt")
    state.write_bytes(b"not a state")  # e.g. a disk that filled up
    _, lines = _run(_train_cfg(), None, tmp_path)
    assert any(line.startswith("ignoring unreadable training state") for line in lines)
    assert next(line[:9] for line in lines if line.startswith("epoch")) == "epoch   1"


def test_the_state_round_trips_every_kind_of_value(tmp_path: Path) -> None:
    state = {
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.98), "params": [0], "foreach": None}]},
        "numpy": np.random.default_rng(7).bit_generator.state,  # 128-bit integers
        "generator": torch.Generator().manual_seed(1).get_state(),
        "bf16": torch.ones(2, dtype=torch.bfloat16), "history": [{"epoch": 1, "loss": 0.5}],
        "nan": float("nan"), "events": ["epoch 2: stalled"],
    }  # fmt: skip
    save_state(tmp_path / "s.pt", state)
    back = load_state(tmp_path / "s.pt", print)
    assert back is not None and back.pop("format") == STATE_FORMAT
    assert back["optimizer"]["state"][0]["step"].item() == 3.0  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)  # tuples stay tuples
    assert back["numpy"] == state["numpy"] and back["history"] == state["history"]
    assert torch.equal(back["generator"], state["generator"])
    assert back["bf16"].dtype == torch.bfloat16 and back["nan"] != back["nan"]
    assert back["events"] == ["epoch 2: stalled"]
    # Not a pickle anywhere: the file is safetensors, its header JSON.
    assert (tmp_path / "s.pt").read_bytes()[8:9] == b"{"


def test_remove_states_keeps_other_runs(tmp_path: Path) -> None:
    names = ("a-0123456789abcdef.pt", "a-b-0123456789abcdef.pt", ".a-0123456789abcdef.pt.x.tmp")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    remove_states(tmp_path, "a")  # another run's file being written is not its to remove
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_run_cut_after_lr_decays_and_early_stopping_resumes_exactly(tmp_path: Path) -> None:
    cfg = {"max_epochs": 14, "patience": 2, "lr_decay_patience": 1, "max_lr_decays": 2}
    straight, lines = _run(_train_cfg(**cfg), None, tmp_path / "a")
    decays = [i for i, line in enumerate(lines) if line.startswith("validation stalled")]
    assert len(decays) == 2 and straight.stopped_by == "early_stopping"
    cut_at = int(lines[decays[0] + 1][6:9])  # the epoch after the first decay
    with pytest.raises(Cut):
        _run(_train_cfg(**cfg), None, tmp_path / "b", cut_at=cut_at)
    resumed, lines = _run(_train_cfg(**cfg), None, tmp_path / "b")
    assert lines[0].startswith(f"resuming after epoch {cut_at - 1}")
    assert (resumed.stopped_by, resumed.epochs_run) == ("early_stopping", straight.epochs_run)
    assert resumed.best_epoch == straight.best_epoch
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_other_threads_resume_with_a_warning(tmp_path: Path) -> None:
    with pytest.raises(Cut):
        _run(_train_cfg(), None, tmp_path, cut_at=2)
    _, lines = _run(_train_cfg(threads=2), None, tmp_path)
    assert any("will not be bit-identical" in line for line in lines)


def test_a_state_that_does_not_fit_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(Cut):
        _run(_train_cfg(), None, tmp_path, cut_at=2)
    (path,) = tmp_path.glob("run-*.pt")
    state = load_state(path, print)
    assert state is not None
    state["model"] = {"nothing": torch.zeros(1)}  # e.g. code that changed the model's layout
    save_state(path, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ValueError, match=r"does not fit this run .*delete it to start"):
        _run(_train_cfg(), None, tmp_path)


def test_a_cut_student_resumes_through_the_pipeline(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    data = "synthetic:users=60,items=30,max_len=10,min_len=4"
    teacher = TeacherRecipe(
        name="t", data={"path": data}, model={"hidden": 8, "max_len": 10},
        train={"max_epochs": 2, "lr": 1e-2},
    )  # fmt: skip
    train_teacher(teacher, store, progress=False, log=lambda _: None)
    student = StudentRecipe(
        name="s", teacher="t@1", model={"hidden": 8, "max_len": 6, "n_blocks": 1},
        train={"max_epochs": 3, "lr": 1e-2}, distill=DistillConfig(top_k=5),
    )  # fmt: skip

    def cut(line: str) -> None:
        if line.startswith("epoch   2"):
            raise Cut

    with pytest.raises(Cut):
        distill_student(student, store, progress=False, log=cut)
    lines: list[str] = []
    m = distill_student(student, store, progress=False, log=lines.append).manifest
    assert any(line.startswith("resuming after epoch 1 of 3") for line in lines)
    assert m.metrics["epochs"] == 3.0 and m.name == "s"
    assert list((tmp_path / ".train-state").iterdir()) == []


def test_a_published_teacher_leaves_no_state(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    recipe = TeacherRecipe(
        name="t", data={"path": "synthetic:users=60,items=30,max_len=10,min_len=4"},
        model={"hidden": 8, "max_len": 10}, train={"max_epochs": 2, "lr": 1e-2},
    )  # fmt: skip
    lines: list[str] = []
    train_teacher(recipe, store, progress=False, log=lines.append)
    assert (tmp_path / ".train-state").is_dir()
    assert list((tmp_path / ".train-state").iterdir()) == []
    assert store.load("t@1")[0].metrics["epochs"] == 2.0
