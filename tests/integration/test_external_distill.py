"""Distilling an ONNX teacher from elsewhere: cached targets equal the in-process teacher's,
the cache is reused, and the student names the teacher by checksum."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compression.configs import DataSpec, DistillConfig, StudentRecipe, TeacherRecipe
from compression.data.sequences import leave_one_out
from compression.distill.external import ExternalTeacher, load_external_teacher
from compression.distill.external_targets import external_targets
from compression.distill.loss import teacher_targets
from compression.model.train import load_checkpoint, training_pairs
from compression.pipeline import distill_from_external, load_from_spec, train_teacher
from model_store.store import ModelStore

DATA = "synthetic:users=300,items=80,max_len=14,min_len=6,seed=5"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path, Path]:
    """A stored teacher's ONNX file and its item ids, used as if trained elsewhere."""
    store = ModelStore(tmp_path_factory.mktemp("ext") / "models")
    recipe = TeacherRecipe(
        name="t", data={"path": DATA}, model={"hidden": 32, "max_len": 16, "n_heads": 2},
        train={"max_epochs": 5, "lr": 5e-3, "threads": 1},
    )  # fmt: skip
    train_teacher(recipe, store, progress=False, log=lambda _: None)
    _, folder = store.load("t@1")
    items = folder.parent / "teacher-items.txt"
    ids = json.loads((folder / "items.json").read_text())["item_ids"]
    items.write_text("\n".join(reversed(ids)) + "\n")  # its own id order, not the data's
    onnx_path = folder.parent / "teacher.onnx"
    onnx_path.write_bytes((folder / "model.onnx").read_bytes())
    # The file's ids are reversed: rewrite the graph's input and output to match them.
    _reverse_ids(onnx_path, len(ids))
    return store, onnx_path, items


def _reverse_ids(path: Path, n: int) -> None:
    """Wrap the graph so it speaks ids in reversed order (a teacher with its own numbering)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inner_in, inner_out = g.input[0].name, g.output[0].name
    to_ours = np.concatenate([[0], np.arange(n, 0, -1)]).astype(np.int64)  # theirs -> ours
    g.initializer.append(numpy_helper.from_array(to_ours, "theirs_to_ours"))
    g.node.insert(0, helper.make_node("Gather", ["theirs_to_ours", "history"], [inner_in]))
    g.node.append(
        helper.make_node("Gather", [inner_out, "theirs_to_ours"], ["scores_theirs"], axis=1)
    )
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("history", TensorProto.INT64, ["b", "n"]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("scores_theirs", TensorProto.FLOAT, ["b", n + 1]))
    onnx.save(model, str(path))


def test_cached_targets_equal_the_in_process_teachers(teacher, tmp_path: Path) -> None:
    store, onnx_path, items = teacher
    data = load_from_spec(DataSpec(path=DATA))
    split = leave_one_out(data)
    ext = load_external_teacher(onnx_path, items, data)
    assert ext.join.unknown_to_teacher == []
    _, folder = store.load("t@1")
    model = load_checkpoint(folder / "model.safetensors")
    inputs, targets = training_pairs(split.train, 16, True, stride=8)
    ours = teacher_targets(model, inputs, targets, 8, top_k=5, temperature=2.0)
    theirs = external_targets(ext, inputs, targets, 8, 5, 2.0, context=16, cache_dir=tmp_path)
    assert np.array_equal(ours.offsets, theirs.offsets)
    assert torch.equal(ours.rank, theirs.rank)
    torch.testing.assert_close(ours.lse, theirs.lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        ours.top_logits.float(), theirs.top_logits.float(), rtol=2e-3, atol=2e-3
    )
    same = (ours.top_ids.long() == theirs.top_ids.long()).float().mean().item()
    assert same > 0.99  # the same top-5 in the same order (fp16 ties aside)


def test_students_of_an_external_teacher_share_its_cached_targets(teacher, monkeypatch) -> None:
    store, onnx_path, items = teacher
    calls: list[int] = []
    real = ExternalTeacher.scores

    def counted(self: ExternalTeacher, histories: np.ndarray) -> np.ndarray:
        calls.append(len(histories))
        return real(self, histories)

    monkeypatch.setattr(ExternalTeacher, "scores", counted)
    recipe = StudentRecipe(
        name="s-ext", teacher="external", model={"hidden": 16, "max_len": 8, "n_blocks": 1},
        train={"max_epochs": 2, "lr": 5e-3, "threads": 1},
        distill=DistillConfig(alpha=1.0, temperature=1.0, top_k=10),
    )  # fmt: skip
    spec = DataSpec(path=DATA)
    first = distill_from_external(
        recipe, spec, onnx_path, items, store, context=16, progress=False, log=lambda _: None
    )
    first_calls = sum(calls)
    calls.clear()
    second = distill_from_external(
        recipe, spec, onnx_path, items, store, context=16, progress=False, log=lambda _: None
    )
    evaluation = sum(calls)  # the second student's teacher runs only to evaluate it
    assert (
        evaluation < first_calls
        and len(list((store.root.parent / ".teacher-cache").iterdir())) == 1
    )
    m = second.manifest
    assert (
        m.parent is None
        and m.recipe["external_teacher"]["sha256"]
        == first.manifest.recipe["external_teacher"]["sha256"]
    )
    assert m.metrics["teacher_test_ndcg@10"] > 0 and 0 < m.metrics["params_ratio"] < 1
    assert m.metrics["test_ndcg@10"] > m.metrics["popularity_test_ndcg@10"]
