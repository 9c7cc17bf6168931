"""ONNX export: signature, dynamic axes, parity with PyTorch, loud failure on drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compression.configs import ModelConfig
from compression.evaluate.metrics import top_k_agreement
from compression.export.exporter import ExportError, check_parity, export_onnx
from compression.model.sasrec import SASRec


def model(seed: int = 0, **kw: object) -> SASRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=60, max_len=12, hidden=16, n_heads=2, **kw)  # type: ignore[arg-type]
    return SASRec(cfg).eval()


def histories(n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 61, size=rng.integers(1, 30)) for _ in range(n)]  # some > max_len


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"emb_dim": 8},
        {"n_blocks": 1},
        {"n_blocks": 3},
        {"head_dim": 4},  # heads pruned: attention narrower than hidden
        {"emb_dim": 4, "successors": 3, "successor_lags": 2},  # sparse successor lists
    ],
)
def test_export_signature_and_parity(tmp_path: Path, kw: dict) -> None:
    m = model(**kw)
    if m.successors is not None:  # fitted on the test histories, weights distinct per slot
        m.successors.fit(histories())
        with torch.no_grad():
            m.successors.weight.copy_(torch.arange(6.0).reshape(2, 3) + 1.0)
    path = tmp_path / "model.onnx"
    export_onnx(m, path)
    assert not list(tmp_path.glob("*.tmp"))
    graph = onnx.load(str(path)).graph
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == ("item_ids", "scores")
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", "length"] and out_dims == ["batch", 61]
    report = check_parity(m, path, histories(), batch_size=7)
    assert report.max_abs_diff < 1e-4 and report.top10_agreement == 1.0


def test_parity_check_fails_loudly_on_a_different_model(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    export_onnx(model(seed=0), path)
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(model(seed=1), path, histories(10))


def test_top_k_agreement() -> None:
    a = np.array([[9.0, *range(20)]])
    assert top_k_agreement(a, a) == 1.0
    b = a.copy()
    b[0, 1:] = b[0, 1:][::-1]  # reversed ranking: top-10 disjoint
    assert top_k_agreement(a, b) == 0.0


def test_graph_is_standard_onnx_and_ignores_padding_and_zeros_inside(tmp_path: Path) -> None:
    m = model()
    path = tmp_path / "model.onnx"
    export_onnx(m, path)
    graph = onnx.load(str(path)).graph
    # standard domain only: FP16 conversion and TensorRT read the same file
    assert {n.domain for n in graph.node} <= {""}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 0, 0, 5, 9, 2], [0, 0, 0, 0, 0, 7], [4, 0, 8, 3, 0, 6]], np.int64)
    got = session.run(["scores"], {"item_ids": ids})[0]
    with torch.inference_mode():
        want = m(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # more left padding changes nothing
    wider = np.concatenate([np.zeros((3, 4), np.int64), ids], axis=1)
    np.testing.assert_allclose(session.run(["scores"], {"item_ids": wider})[0], got, atol=1e-5)


def test_both_writers_give_the_same_scores_and_a_bad_writer_is_named(tmp_path: Path) -> None:
    m = model(n_blocks=2)
    paths = {w: tmp_path / f"{w}.onnx" for w in ("graph", "torch")}
    for writer, path in paths.items():
        export_onnx(m, path, writer=writer)  # type: ignore[arg-type]
    ids = np.array([[0, 0, 3, 9, 14, 2, 7, 1, 5, 8, 11, 4, 6, 10]], np.int64)  # > max_len
    graph, torch_out = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            ["scores"], {"item_ids": ids}
        )[0]
        for p in paths.values()
    )
    np.testing.assert_allclose(graph, torch_out, atol=1e-5)
    # the written graph is much smaller: no shape arithmetic
    nodes = {w: len(onnx.load(str(p)).graph.node) for w, p in paths.items()}
    assert nodes["graph"] < nodes["torch"] / 2, nodes
    with pytest.raises(ValueError, match="writer='tf'"):
        export_onnx(m, tmp_path / "x.onnx", writer="tf")  # type: ignore[arg-type]


def test_a_user_vector_graph_matches_pytorch_and_refuses_successor_lists(tmp_path: Path) -> None:
    from compression.export.exporter import export_user_model

    m = model(emb_dim=8)
    worst = export_user_model(m, tmp_path / "user.onnx", histories())
    graph = onnx.load(str(tmp_path / "user.onnx")).graph
    out = graph.output[0]
    assert out.name == "user_vector" and worst < 1e-4
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 8]
    with pytest.raises(ValueError, match="successor lists add to the score row"):
        export_user_model(model(successors=2), tmp_path / "no.onnx", histories())
