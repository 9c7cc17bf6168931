"""INT8 / FP16 variants: same signature, close scores, smaller files, adaptive budget, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from pydantic import ValidationError

from compression.configs import ModelConfig
from compression.data.sequences import Split, leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.evaluate.onnx_scoring import compare_outputs, ndcg_evaluator
from compression.export.exporter import export_onnx
from compression.export.files import QuantizeError, describe
from compression.quantize.adaptive import adaptive_quantize
from compression.quantize.cpu_int8 import int8_needs_reduce_range
from compression.quantize.fp16 import convert_fp16
from compression.quantize.int8 import (
    QuantizeConfig,
    quantizable_nodes,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from compression.quantize.item_matrix import quantize_item_matrix, quantize_rows
from tests.conftest import quick_train

MAX_LEN = 20
N_ITEMS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Split]:
    """A tiny SASRec trained a few epochs on synthetic data (structured weights, not random)."""
    data = synthetic_dataset(SyntheticConfig(users=400, items=N_ITEMS, min_len=5, max_len=20))
    split = leave_one_out(data)
    cfg = ModelConfig(n_items=N_ITEMS, max_len=MAX_LEN, hidden=32, n_blocks=2, n_heads=2)
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(quick_train(cfg, split, epochs=3), path)
    return path, split


def valid_histories(split: Split) -> list[np.ndarray]:
    hist, _ = split.eval_inputs("valid")
    long = [np.concatenate([h, h])[: MAX_LEN + 7] for h in hist[:20]]  # wider than the window
    return [*hist, *long]


def scores(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["scores"], {"item_ids": batch})[0]


def static(cal: str) -> Callable[[Path, Path, Split], object]:
    cfg = QuantizeConfig(mode="static", calibration=cal, calibration_sequences=64, entropy_bins=256)
    return lambda s, d, split: quantize_static_int8(s, d, cfg, split.train, MAX_LEN)


def item_then_dynamic(src: Path, dst: Path, split: Split) -> object:
    mid = dst.with_name("item.onnx")
    quantize_item_matrix(src, mid)
    return quantize_dynamic_int8(mid, dst)


RECIPES: dict[str, Callable[[Path, Path, Split], object]] = {
    "dynamic": lambda s, d, _: quantize_dynamic_int8(s, d),
    "dynamic-per-channel": lambda s, d, _: quantize_dynamic_int8(
        s, d, QuantizeConfig(per_channel=True)
    ),
    "static-minmax": static("minmax"),
    "static-entropy": static("entropy"),
    "static-percentile": static("percentile"),
    "item-matrix-int8": lambda s, d, _: quantize_item_matrix(s, d, "int8"),
    "item-matrix-float": lambda s, d, _: quantize_item_matrix(s, d, "float"),
    "item-matrix+dynamic": item_then_dynamic,
    "fp16": lambda s, d, _: convert_fp16(s, d),
}
# Recipes that really quantize the block MatMuls (fp16 and item-matrix-only do not).
INT8_BLOCKS = {k for k in RECIPES if k.startswith(("dynamic", "static")) or "+" in k}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_keeps_signature_and_scores(
    trained: tuple[Path, Split], tmp_path: Path, recipe: str
) -> None:
    src, split = trained
    dst = tmp_path / f"{recipe}.onnx"
    RECIPES[recipe](src, dst, split)
    assert not list(tmp_path.glob("*.tmp"))
    graph = onnx.load(str(dst)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == ("item_ids", onnx.TensorProto.INT64)
    assert (out.name, out.type.tensor_type.elem_type) == ("scores", onnx.TensorProto.FLOAT)

    hist = valid_histories(split)
    cmp = compare_outputs(src, dst, hist, MAX_LEN)
    assert cmp.sequences == len(hist)
    assert cmp.top10_agreement >= 0.95, cmp
    # Static QDQ keeps 8-bit weights; where u8 x s8 sums saturate int16 (no VNNI) a few
    # scores move further (0.11 measured on an AVX2-only EPYC), the ranking barely.
    saturating = recipe.startswith("static") and int8_needs_reduce_range()
    assert cmp.max_abs_diff < (0.15 if saturating else 0.05), cmp
    assert cmp.max_abs_diff > 0  # something was really converted
    short = scores(dst, np.array([[0, 0, 3, 4], [5, 6, 7, 8]], dtype=np.int64))
    assert short.shape == (2, N_ITEMS + 1) and short.dtype == np.float32

    summary = describe(dst)
    assert summary.bytes < describe(src).bytes
    if recipe in INT8_BLOCKS:
        # all nine weight MatMuls (the last block's q and kv projections included) are int8;
        # the output Gemm on the shared item matrix too, except with dynamic (MatMul only)
        assert summary.int8_matmuls == (9 if recipe.startswith("dynamic") else 10), summary
    if recipe == "fp16":
        # every float weight is fp16; the rest are int64 index constants (slice bounds)
        assert set(summary.initializer_bytes) <= {"FLOAT16", "INT64"}, summary.initializer_bytes
        assert summary.initializer_bytes["FLOAT16"] > 50 * summary.initializer_bytes["INT64"]


def test_dynamic_and_static_shrink_and_quantize_what_they_should(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    fp32 = describe(src)
    assert fp32.int8_matmuls == 0
    dyn = quantize_dynamic_int8(src, tmp_path / "dyn.onnx")
    assert dyn.op_counts.get("MatMulInteger", 0) == 9
    assert dyn.initializer_bytes["INT8"] > 0
    # the activation x activation attention products stay float (constant weights only), and
    # the output Gemm (dynamic quantizes MatMul only: the output product is the most harmful)
    attn = [n for n in dyn.float_matmuls if "attn/MatMul" in n]
    assert len(attn) == 4 and len(dyn.float_matmuls) == 5
    st = quantize_static_int8(
        src, tmp_path / "st.onnx", QuantizeConfig(mode="static"), split.train, MAX_LEN
    )
    assert st.op_counts["DequantizeLinear"] >= 20  # weights and inputs of ten MatMuls
    assert st.float_matmuls == tuple(attn)  # static (MatMul + Gemm) also takes the output
    # scores are never quantized: the last op still produces float scores from a product
    last = next(n for n in onnx.load(str(st.path)).graph.node if "scores" in n.output)
    assert last.op_type in ("MatMul", "Gemm")


def test_entropy_calibration_gets_enough_bins(
    trained: tuple[Path, Split], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ORT's own defaults (128 bins, 128 quantized bins) entropy equals min/max."""
    import onnxruntime.quantization as ortq

    seen: list[dict[str, object]] = []
    original = ortq.create_calibrator

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(dict(kwargs["extra_options"]))  # type: ignore[call-overload]
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ortq, "create_calibrator", spy)
    src, split = trained
    cfg = QuantizeConfig(
        mode="static", calibration="entropy", entropy_bins=256, calibration_sequences=32
    )
    quantize_static_int8(src, tmp_path / "ent.onnx", cfg, split.train, MAX_LEN)
    assert seen == [{"num_bins": 256, "num_quantized_bins": 128}]


def test_static_with_all_matmuls_quantizes_attention_too(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    cfg = QuantizeConfig(mode="static", matmul_const_b_only=False, calibration_sequences=32)
    st = quantize_static_int8(src, tmp_path / "st.onnx", cfg, split.train, MAX_LEN)
    assert st.float_matmuls == () and st.int8_matmuls == 14


def test_item_matrix_is_int8_per_row_and_shared(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    fp32_model = onnx.load(str(src))
    emb = next(
        onnx.numpy_helper.to_array(i)
        for i in fp32_model.graph.initializer
        if i.name == "item_emb.weight"
    )
    report = quantize_item_matrix(src, tmp_path / "item.onnx")
    assert report.shared and report.gather_quantized and report.output_quantized
    assert (report.rows, report.dim) == (N_ITEMS + 1, 32)
    # one fp32 copy shared by the Gather and the output Gemm -> one int8 copy + row scales
    saved = report.bytes_before - report.bytes_after
    assert saved >= 0.8 * (4 * emb.size - emb.size - 4 * emb.shape[0]), saved
    graph = onnx.load(str(report.path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    int8 = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 2]
    assert len(int8) == 1 and int8[0].shape == emb.shape
    scale = inits["item_emb.weight.row_scale"]
    assert scale.shape == (N_ITEMS + 1,)
    np.testing.assert_allclose(int8[0] * scale[:, None], emb, atol=scale.max() / 2 + 1e-7)
    assert not any(
        v.dtype == np.float32 and v.shape in (emb.shape, emb.T.shape) for v in inits.values()
    )
    ops = {n.op_type for n in graph.node}
    assert {"QGemm", "DynamicQuantizeLinear"} <= ops
    # QGemm's u8 x s8 products: 7-bit rows where this CPU would saturate 8-bit ones
    assert report.row_bits == (7 if int8_needs_reduce_range() else 8)
    assert np.abs(int8[0]).max() == 2 ** (report.row_bits - 1) - 1
    for compute, reduce, bits in [("int8", True, 7), ("int8", False, 8), ("float", None, 8)]:
        chosen = quantize_item_matrix(src, tmp_path / f"{compute}{reduce}.onnx", compute, reduce)
        assert chosen.row_bits == bits

    # dynamic first: ORT's transposed copy of the output matrix is folded back onto the
    # Gather's (one fp32 matrix), so the item-matrix step still finds one shared matrix
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic_int8(src, dyn)
    dyn_graph = onnx.load(str(dyn)).graph
    mats = [i for i in dyn_graph.initializer if i.data_type == onnx.TensorProto.FLOAT
            and len(i.dims) == 2 and N_ITEMS + 1 in i.dims]  # fmt: skip
    assert len(mats) == 1
    after = quantize_item_matrix(dyn, tmp_path / "dyn-item.onnx")
    assert after.gather_quantized and after.output_quantized and after.shared
    assert after.bytes_after < describe(dyn).bytes
    cmp = compare_outputs(src, after.path, valid_histories(split), MAX_LEN)
    assert cmp.top10_agreement >= 0.95
    with pytest.raises(QuantizeError, match="no fp32 item matrix"):
        quantize_item_matrix(after.path, tmp_path / "again.onnx")


def test_quantize_rows_is_symmetric_per_row() -> None:
    m = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [100.0, 50.0, -25.0]], dtype=np.float32)
    q, s = quantize_rows(m)
    assert q.dtype == np.int8 and s.dtype == np.float32
    assert s.tolist() == pytest.approx([1.0, 2 / 127, 100 / 127])
    assert q[0].tolist() == [0, 0, 0] and q[1, 1] == -127 and q[2, 0] == 127
    np.testing.assert_allclose(q * s[:, None], m, atol=float(s.max()) / 2)


def test_adaptive_budget_zero_keeps_harmful_nodes_float(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    """A scripted evaluator: quality drops while either of two nodes is quantized, so a
    budget of 0 must keep exactly the most sensitive nodes up to both of them in float."""
    src, split = trained
    hist, _ = split.eval_inputs("valid")
    cfg = QuantizeConfig(max_ndcg_loss=0.0, proxy_sequences=64)
    probe = adaptive_quantize(
        src,
        tmp_path / "probe.onnx",
        cfg.model_copy(update={"max_ndcg_loss": 0.9}),
        lambda p: 0.5,
        hist,
        MAX_LEN,
    )
    order = [s.node for s in probe.sensitivities]
    assert len(order) == 9 and probe.kept_float == ()
    harmful = {order[0], order[2]}  # the greedy must pass order[1] to reach order[2]

    def scripted(path: Path) -> float:
        still_float = set(describe(path).float_matmuls)
        return 0.5 - 0.1 * len(harmful - still_float)

    result = adaptive_quantize(src, tmp_path / "ad.onnx", cfg, scripted, hist, MAX_LEN)
    assert result.kept_float == tuple(order[:3])
    assert result.final_ndcg == result.fp32_ndcg == 0.5 and result.relative_loss == 0.0
    assert result.evaluations == 1 + 4 and result.proxy_runs == 9
    assert [k for k, _ in result.trace] == [0, 1, 2, 3]
    summary = describe(result.path)
    assert set(result.kept_float) <= set(summary.float_matmuls)
    assert summary.int8_matmuls == 9 - 3
    names = {n.name for n in onnx.load(str(result.path)).graph.node}
    assert all(f"{k}_quant" not in names for k in result.kept_float)
    assert result.as_manifest()["kept_float_nodes"] == list(result.kept_float)


def test_adaptive_with_real_ndcg_and_huge_budget_keeps_none(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    evaluate = ndcg_evaluator(split, MAX_LEN, users=150, threads=1)
    fp32 = evaluate(src)
    assert 0.1 < fp32 <= 1.0
    hist, _ = split.eval_inputs("valid")
    cfg = QuantizeConfig(adaptive=True, max_ndcg_loss=0.5, proxy_sequences=64)
    result = adaptive_quantize(src, tmp_path / "ad.onnx", cfg, evaluate, hist, MAX_LEN)
    assert result.kept_float == () and result.evaluations == 2
    assert result.fp32_ndcg == fp32 and abs(result.relative_loss) < 0.5
    assert describe(result.path).int8_matmuls == 9
    # the per-node ranking is sorted, most harmful first
    mse = [s.score_rel_mse for s in result.sensitivities]
    assert mse == sorted(mse, reverse=True) and mse[0] > 0


def test_adaptive_static_calibrates_and_respects_exclusions(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    hist, _ = split.eval_inputs("valid")
    first = quantizable_nodes(src, QuantizeConfig())[0]
    cfg = QuantizeConfig(
        mode="static", calibration_sequences=32, proxy_sequences=32, nodes_to_exclude=(first,)
    )
    result = adaptive_quantize(
        src, tmp_path / "st.onnx", cfg, lambda p: 0.3, hist, MAX_LEN, split.train
    )
    assert first not in {s.node for s in result.sensitivities}
    assert len(result.sensitivities) == 9 and first in describe(result.path).float_matmuls
    with pytest.raises(QuantizeError, match="calibration_histories"):
        adaptive_quantize(src, tmp_path / "x.onnx", cfg, lambda p: 0.3, hist, MAX_LEN)


def test_unreachable_budget_raises_and_writes_nothing(
    trained: tuple[Path, Split], tmp_path: Path
) -> None:
    src, split = trained
    hist, _ = split.eval_inputs("valid")
    dst = tmp_path / "ad.onnx"
    cfg = QuantizeConfig(max_ndcg_loss=0.0, proxy_sequences=16)
    with pytest.raises(QuantizeError, match=r"unreachable.*nothing written"):
        adaptive_quantize(src, dst, cfg, lambda p: 0.5 if p == src else 0.4, hist, MAX_LEN)
    assert list(tmp_path.iterdir()) == []


def test_config_validation() -> None:
    assert QuantizeConfig().quantized_op_types == ("MatMul",)
    assert QuantizeConfig(mode="static").quantized_op_types == ("MatMul", "Gemm")
    bad: list[dict[str, object]] = [
        {"bogus": 1},
        {"mode": "fp8"},
        {"max_ndcg_loss": -0.1},
        {"max_ndcg_loss": 1.0},
        {"mode": "static", "calibration_sequences": 0},
        {"mode": "static", "calibration": "kl"},
        {"op_types": []},
        {"op_types": ["Gemm"]},  # ORT has no dynamic Gemm
        {"mode": "static", "op_types": ["MatMul", "MatMul"]},
        {"calibration": "entropy"},  # a static-only field with mode="dynamic"
    ]
    for kw in bad:
        with pytest.raises(ValidationError):
            QuantizeConfig(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="bogus"):
        QuantizeConfig(bogus=1)  # type: ignore[call-arg]


def test_errors_name_the_file(trained: tuple[Path, Split], tmp_path: Path) -> None:
    src, split = trained
    missing = tmp_path / "missing.onnx"
    with pytest.raises(QuantizeError, match=r"missing\.onnx: no such file"):
        quantize_dynamic_int8(missing, tmp_path / "out.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    for fn in (quantize_dynamic_int8, convert_fp16, quantize_item_matrix):
        with pytest.raises(QuantizeError, match=r"junk\.onnx: not an ONNX model"):
            fn(junk, tmp_path / "out.onnx")
    with pytest.raises(QuantizeError, match=r"nowhere.*does not exist"):
        quantize_dynamic_int8(src, tmp_path / "nowhere" / "out.onnx")
    with pytest.raises(QuantizeError, match=r"model\.onnx: .*training histories"):
        quantize_static_int8(src, tmp_path / "o.onnx", QuantizeConfig(mode="static"), [], MAX_LEN)
    with pytest.raises(QuantizeError, match="needs mode='static'"):
        quantize_static_int8(src, tmp_path / "o.onnx", QuantizeConfig(), split.train, MAX_LEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


def shape_sliced_model(path: Path, n_rows: int = 9, dim: int = 8) -> None:
    """A graph whose second weight reaches its MatMul through `Slice(W, 0, Shape(x)[2])`, the
    pattern older exports of the last block have (`w[:hidden]` with `hidden` from x.shape)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n_rows, dim)).astype(np.float32)
    inits = [
        nh.from_array(emb, "emb"),
        nh.from_array(emb.T.copy(), "emb_t"),
        nh.from_array(rng.normal(size=(dim, 2 * dim)).astype(np.float32), "w"),
        nh.from_array(np.array(2, dtype=np.int64), "two"),
        nh.from_array(np.array([0], dtype=np.int64), "zero1"),
        nh.from_array(np.array([1], dtype=np.int64), "one1"),
    ]
    nodes = [
        h.make_node("Gather", ["emb", "item_ids"], ["x"]),
        h.make_node("ReduceMean", ["x", "one1"], ["pooled"], keepdims=0),
        h.make_node("Shape", ["x"], ["shape"]),
        h.make_node("Gather", ["shape", "two"], ["hidden"]),
        h.make_node("Unsqueeze", ["hidden", "zero1"], ["hidden1"]),
        h.make_node("Slice", ["w", "zero1", "hidden1", "one1"], ["w_used"]),
        h.make_node("MatMul", ["pooled", "w_used"], ["query"], name="sliced_matmul"),
        h.make_node("MatMul", ["query", "emb_t"], ["scores"], name="output_matmul"),
    ]
    graph = h.make_graph(
        nodes,
        "sliced",
        [h.make_tensor_value_info("item_ids", T.INT64, ["batch", "length"])],
        [h.make_tensor_value_info("scores", T.FLOAT, ["batch", n_rows])],
        inits,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))


def test_weights_sliced_by_a_static_shape_are_quantized_too(tmp_path: Path) -> None:
    src = tmp_path / "sliced.onnx"
    shape_sliced_model(src)
    assert quantizable_nodes(src, QuantizeConfig()) == ["output_matmul"]  # before folding
    out = quantize_dynamic_int8(src, tmp_path / "dyn.onnx")
    assert out.int8_matmuls == 2 and out.float_matmuls == ()
    batch = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int64)
    np.testing.assert_allclose(scores(out.path, batch), scores(src, batch), atol=0.2)
    # the dynamic length dimension is never folded: other widths still run
    assert scores(out.path, batch[:, :1]).shape == (2, 9)
