"""External ONNX teachers: the contract checks, the item-id join, and scores in data ids from
a model the project did not write (a small bidirectional Transformer exported by PyTorch)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from compression.data.sequences import SequenceDataset
from compression.distill.external import (
    TeacherContractError,
    join_items,
    load_external_teacher,
    parameter_count,
    read_teacher_items,
)

TEACHER_ITEMS = [f"SKU-{i:04d}" for i in range(1, 13)]  # the teacher's ids 1..12


class Bidirectional(nn.Module):
    """Not the project's model: a bidirectional encoder scoring from the last position."""

    def __init__(self, n_items: int, dim: int = 16) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_items + 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.items(ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Every position sees every other item (no causal mask); padding keys hidden.
        logits = q @ k.transpose(1, 2) / x.shape[-1] ** 0.5
        logits = logits.masked_fill((ids == 0)[:, None, :], -1e4)
        x = self.norm(x + torch.softmax(logits, dim=-1) @ v)
        return self.out(x[:, -1])


def exported_teacher(path: Path, cls: type[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = (cls or Bidirectional)(len(TEACHER_ITEMS)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randint(1, 13, (2, 5)),), str(path), input_names=["history"],
            output_names=["logits"], opset_version=17, dynamo=False,
            dynamic_axes={"history": {0: "b", 1: "n"}, "logits": {0: "b"}},
        )  # fmt: skip
    return model


def dataset(item_ids: list[str]) -> SequenceDataset:
    n = len(item_ids)
    return SequenceDataset(
        name="shop", sequences=[np.arange(1, n + 1)], n_items=n, item_ids=item_ids,
        user_ids=["u1"], sha256="0" * 64,
    )  # fmt: skip


def graph(
    path: Path,
    inputs: list[tuple[str, int, list]],
    outputs: list[tuple[str, int, list]],
) -> Path:
    """A graph whose outputs are constants of the declared shapes (contract checks only)."""
    nodes = [
        helper.make_node(
            "Constant", [], [name], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
        )
        for name, _, _ in outputs
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(model, str(path))
    return path


@pytest.fixture
def items_file(tmp_path: Path) -> Path:
    path = tmp_path / "items.txt"
    path.write_text("\n".join(TEACHER_ITEMS) + "\n")
    return path


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        (
            [("history", TensorProto.INT64, ["b", "n"]), ("mask", TensorProto.BOOL, ["b", "n"])],
            [("scores", TensorProto.FLOAT, ["b", 13])],
            "has 2 inputs ['history', 'mask']; a teacher takes exactly one",
        ),
        (
            [("history", TensorProto.FLOAT, ["b", "n"])],
            [("scores", TensorProto.FLOAT, ["b", 13])],
            "input 'history' is FLOAT; the history must be int64",
        ),
        (
            [("history", TensorProto.INT64, ["b", "n"])],
            [("scores", TensorProto.FLOAT, ["b", 20])],
            "output 'scores' is 20 wide; the item file lists 12 items, so it must be 13",
        ),
        (
            [("history", TensorProto.INT64, ["b", "n"])],
            [("scores", TensorProto.FLOAT, ["b", 13]), ("extra", TensorProto.FLOAT, ["b"])],
            "has 2 outputs ['scores', 'extra']",
        ),
        (
            [("history", TensorProto.INT64, [1, 200])],
            [("scores", TensorProto.FLOAT, [1, 13])],
            "input 'history' has fixed sizes [1, 200]",
        ),
    ],
)
def test_contract_violations_are_one_line_naming_the_problem(
    tmp_path: Path, items_file: Path, inputs: list, outputs: list, message: str
) -> None:
    path = graph(tmp_path / "t.onnx", inputs, outputs)
    with pytest.raises(TeacherContractError) as err:
        load_external_teacher(path, items_file, dataset(TEACHER_ITEMS))
    assert message in str(err.value) and "\n" not in str(err.value)


class BakedBatch(nn.Module):
    """Traced with the example's batch size baked into a reshape (a classic export slip)."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, 4)
        self.out = nn.Linear(4, n_items + 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch = int(ids.shape[0])  # a Python int: a constant in the traced graph
        return self.out(self.items(ids).mean(1).reshape(batch, 4))


def test_a_graph_with_baked_sizes_is_refused_in_one_line(tmp_path: Path, items_file: Path) -> None:
    path = tmp_path / "baked.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            BakedBatch(len(TEACHER_ITEMS)).eval(), (torch.randint(1, 13, (2, 5)),), str(path),
            input_names=["history"], output_names=["logits"], opset_version=17, dynamo=False,
            dynamic_axes={"history": {0: "b", 1: "n"}, "logits": {0: "b"}},
        )  # fmt: skip
    with pytest.raises(TeacherContractError) as err:
        load_external_teacher(path, items_file, dataset(TEACHER_ITEMS))
    message = str(err.value)
    assert "fails on a [1, 1] history batch" in message and "\n" not in message


def test_unknown_items_are_reported_not_guessed(tmp_path: Path, items_file: Path) -> None:
    data = dataset(["SKU-0003", "NEW-1", "SKU-0001", "NEW-2"])
    join = join_items(data, read_teacher_items(items_file))
    assert join.columns.tolist() == [0, 3, 0, 1, 0]
    assert join.unknown_to_teacher == ["NEW-1", "NEW-2"] and join.unused_teacher_items == 10
    assert "not known to the teacher: 2 (NEW-1, NEW-2)" in join.report()
    exported_teacher(tmp_path / "t.onnx")
    with pytest.raises(TeacherContractError, match="none of the data set's 2 items"):
        load_external_teacher(tmp_path / "t.onnx", items_file, dataset(["A", "B"]))


def test_teacher_item_files_repeat_nothing_and_read_csv(tmp_path: Path) -> None:
    dup = tmp_path / "dup.txt"
    dup.write_text("7\n007\n")
    with pytest.raises(TeacherContractError, match=r"'007' \(line 2\) repeats '7'"):
        read_teacher_items(dup)
    table = tmp_path / "items.csv"
    table.write_text("item_id,title\nB00X,hat\nB00Y,scarf\n")
    assert read_teacher_items(table) == ["B00X", "B00Y"]


def test_scores_of_a_pytorch_exported_teacher_arrive_in_data_ids(
    tmp_path: Path, items_file: Path
) -> None:
    model = exported_teacher(tmp_path / "t.onnx")
    # The data set knows 4 of the teacher's items, in another order, plus one it does not.
    data = dataset(["SKU-0005", "SKU-0002", "NEW-1", "SKU-0012", "SKU-0007"])
    teacher = load_external_teacher(tmp_path / "t.onnx", items_file, data)
    histories = np.array([[0, 1, 2, 4], [3, 5, 1, 2]])  # data ids, left-padded
    got = teacher.scores(histories)
    teacher_ids = torch.tensor([[0, 5, 2, 12], [0, 7, 5, 2]])  # NEW-1 dropped to padding
    with torch.no_grad():
        want = model(teacher_ids).numpy()
    columns = [5, 2, 12, 7]  # data ids 1, 2, 4, 5
    np.testing.assert_allclose(got[:, [1, 2, 4, 5]], want[:, columns], rtol=1e-4, atol=1e-5)
    assert np.isneginf(got[:, [0, 3]]).all()  # padding and the unknown item
    assert len(teacher.sha256) == 64


class Tied(Bidirectional):
    """The same encoder scoring with its item embeddings (weight tying, as SASRec does)."""

    def __init__(self, n_items: int, dim: int = 16) -> None:
        super().__init__(n_items, dim)
        self.out = nn.Linear(dim, n_items + 1, bias=False)
        self.out.weight = self.items.weight


@pytest.mark.parametrize("cls", [Bidirectional, Tied])
def test_parameter_count_counts_a_tied_matrix_once(tmp_path: Path, cls: type) -> None:
    model = exported_teacher(tmp_path / "t.onnx", cls)
    graph = onnx.load(str(tmp_path / "t.onnx"))
    stored = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    want = sum(p.numel() for p in model.parameters())  # PyTorch counts a shared tensor once
    assert parameter_count(graph) == want
    if cls is Tied:
        assert stored == want + model.items.weight.numel()  # the exporter's second copy
