"""4-bit weights: the int4 pass (item rows, MatMulNBits / per-column blocks, id tables), its
parity with fp32, its errors, and fake-quant fine-tuning that the int4 pass stores exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from compression.configs import ModelConfig
from compression.data.sequences import Split, leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.export.exporter import export_onnx
from compression.export.files import QuantizeError
from compression.model.fake_quant import add_int4_fake_quant, bake_int4_fake_quant
from compression.model.sasrec import SASRec
from compression.quantize.int4 import (
    _half_floats,
    _matmul_nbits,
    dequantize_rows_int4,
    quantize_int4,
    quantize_rows_int4,
)
from compression.quantize.item_matrix import quantize_item_matrix
from tests.conftest import quick_train

N_ITEMS = 1200  # item table 1201 x 16: above the int4 table threshold
CFG = ModelConfig(
    n_items=N_ITEMS, max_len=30, hidden=32, emb_dim=16, n_blocks=2, n_heads=2, successors=2
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SASRec, Path, Split]:
    data = synthetic_dataset(
        SyntheticConfig(users=600, items=N_ITEMS, min_len=5, max_len=30, clusters=12)
    )
    split = leave_one_out(data)
    model = quick_train(CFG, split, epochs=2)
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(model, path)
    return model, path, split


def scores(path: Path, batch: np.ndarray) -> np.ndarray:
    from model_store.runtime import ort_session

    return ort_session(path, 1).run(["scores"], {"item_ids": batch})[0]


def histories(split: Split) -> np.ndarray:
    from compression.data.sequences import pad_left

    return pad_left(split.eval_inputs("valid")[0][:64], CFG.max_len)


def top10_agreement(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb, strict=True)]))


def test_rows_are_symmetric_int4_with_float16_scales() -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 24)).astype(np.float32) * np.arange(1, 7)[:, None]
    m[0] = 0.0
    q, scale = quantize_rows_int4(m)
    assert q.dtype == np.int8 and scale.dtype == np.float16
    assert q.min() >= -7 and q.max() <= 7 and (np.abs(q[1:]).max(axis=1) == 7).all()
    assert scale[0] == 1.0 and not q[0].any()
    # Half a step of the float16-rounded scale at most.
    err = np.abs(dequantize_rows_int4(q, scale) - m)
    assert (err <= scale.astype(np.float32)[:, None] / 2 + 1e-6).all()
    with pytest.raises(QuantizeError, match="NaN"):
        quantize_rows_int4(np.array([[1.0, np.nan]], dtype=np.float32))


@pytest.mark.parametrize("block_size", [None, 16, 32])
def test_int4_keeps_the_signature_and_the_ranking(
    trained: tuple[SASRec, Path, Split], tmp_path: Path, block_size: int | None
) -> None:
    _, src, split = trained
    dst = tmp_path / "int4.onnx"
    report = quantize_int4(src, dst, block_size)
    model = onnx.load(str(dst))
    assert [i.name for i in model.graph.input] == ["item_ids"]
    assert [o.name for o in model.graph.output] == ["scores"]
    inits = {i.name: i for i in model.graph.initializer}
    # One int4 copy of the tied item matrix, id tables in int16, no float32 matrix left.
    assert inits["item_emb.weight.int4_rows"].data_type == TensorProto.INT4
    assert list(inits["item_emb.weight.int4_rows"].dims) == [N_ITEMS + 1, 16]
    assert "item_emb.weight" in report.tables and "successors.succ" in report.narrowed
    assert inits["successors.succ.int16"].data_type == TensorProto.INT16
    big_floats = [
        n for n, t in inits.items() if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 64
    ]
    assert not big_floats
    ops = [n.op_type for n in model.graph.node]
    if block_size is None:
        assert "MatMulNBits" not in ops and report.matmuls == ops.count("DequantizeLinear") - 1
    else:
        assert ops.count("MatMulNBits") == report.matmuls
    assert report.matmuls >= 2 * 4  # every block's projections and FFN
    # Half the int8 file's bytes or less, close ranking to fp32.
    int8 = tmp_path / "int8.onnx"
    quantize_item_matrix(src, int8)
    assert report.bytes_after < 0.75 * int8.stat().st_size
    assert report.bytes_after < report.bytes_before / 3
    batch = histories(split)
    assert top10_agreement(scores(src, batch), scores(dst, batch)) >= 0.75


def test_int4_errors_name_the_problem(trained: tuple[SASRec, Path, Split], tmp_path: Path) -> None:
    _, src, _ = trained
    with pytest.raises(QuantizeError, match="block_size=24"):
        quantize_int4(src, tmp_path / "x.onnx", 24)
    once = tmp_path / "once.onnx"
    quantize_int4(src, once)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_int4(once, tmp_path / "twice.onnx")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "twice.onnx").exists()


@pytest.mark.parametrize("block_size", [None, 16])
def test_fake_quant_weights_are_stored_exactly_by_the_int4_pass(
    trained: tuple[SASRec, Path, Split], tmp_path: Path, block_size: int | None
) -> None:
    model, _, split = trained
    tuned = SASRec(model.cfg)
    tuned.load_state_dict(model.state_dict())
    # The item table (positions: 30 x 32, below the table threshold), blocks, projections.
    assert add_int4_fake_quant(tuned, block_size) == 1 + 2 * 4 + 2
    with torch.no_grad():
        seen = tuned.item_emb.weight.clone()  # what the forward pass sees
    assert bake_int4_fake_quant(tuned) == 11
    assert torch.equal(tuned.item_emb.weight, seen)
    # On the grid: at most 15 distinct values per row of a table.
    assert max(len(torch.unique(r)) for r in tuned.item_emb.weight) <= 15
    fp32, int4 = tmp_path / "baked.onnx", tmp_path / "baked-int4.onnx"
    export_onnx(tuned.eval(), fp32)
    quantize_int4(fp32, int4, block_size)
    batch = histories(split)
    # Only float16 biases and norms differ from the fake-quantized model.
    np.testing.assert_allclose(scores(int4, batch), scores(fp32, batch), atol=5e-3)
    assert top10_agreement(scores(int4, batch), scores(fp32, batch)) >= 0.99


def test_tiny_and_zero_rows_get_the_int4_pass_scales() -> None:
    table = torch.nn.Embedding(1100, 8)
    with torch.no_grad():
        table.weight[0] = 0.0
        table.weight[1] = 1e-7 * torch.arange(8)  # below float16's normal range
    expected = dequantize_rows_int4(*quantize_rows_int4(table.weight.detach().numpy()))
    add_int4_fake_quant(table)
    np.testing.assert_array_equal(table.weight.detach().numpy(), expected)


def test_fake_quant_passes_gradients_straight_through() -> None:
    layer = torch.nn.Linear(8, 3)
    add_int4_fake_quant(layer, None)
    layer(torch.ones(2, 8)).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    assert grad is not None and torch.allclose(grad, torch.full((3, 8), 2.0))


@pytest.mark.parametrize("block_size", [None, 16])
def test_column_fake_quant_is_onnxruntimes_int4_grid(block_size: int | None) -> None:
    """The Linear fake quant and ONNX Runtime's quantizer (plus the float16 scales the int4
    pass stores) give the same weights: the extreme of each column block maps to -8."""
    from onnx import helper

    from model_store.runtime import ort_session

    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 5, bias=False)  # 40 inputs: blocks of 16 need padding
    w_t = layer.weight.detach().numpy().T.copy()  # [in, out], as the exporter writes it
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [40, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [40, 5])],
        [numpy_helper.from_array(w_t, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    model, rewritten = _matmul_nbits(model, block_size)
    _half_floats(model)
    assert rewritten == 1
    stored = ort_session(model.SerializeToString(), 1).run(
        None, {"x": np.eye(40, dtype=np.float32)}
    )[0]
    add_int4_fake_quant(layer, block_size)
    seen = layer.weight.detach().numpy().T
    assert np.mean(np.isclose(stored, seen, rtol=0, atol=1e-7)) >= 0.99
    assert max(len(np.unique(col)) for col in seen.T) <= 16 * (1 if block_size is None else 3)


def test_the_int4_file_asks_sessions_to_fold_its_weights(
    trained: tuple[SASRec, Path, Split], tmp_path: Path
) -> None:
    """4 bits on disk, float weights once loaded: the session factory reads the marker and
    lets ONNX Runtime fold the DequantizeLinear of constants (same scores either way)."""
    import onnxruntime as ort

    from model_store.runtime import folds_weights, ort_session

    _, src, split = trained
    dst = tmp_path / "int4.onnx"
    quantize_int4(src, dst)
    optimized = tmp_path / "optimized.onnx"
    session = ort_session(dst, 1, optimized_model_path=optimized)
    assert folds_weights(session) and not folds_weights(ort_session(src, 1))
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert "DequantizeLinear" not in ops  # folded: nothing unpacked per call
    unfolded = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    batch = histories(split)
    plain = unfolded.run(["scores"], {"item_ids": batch})[0]
    np.testing.assert_allclose(session.run(["scores"], {"item_ids": batch})[0], plain, atol=1e-4)
