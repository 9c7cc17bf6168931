"""One ONNX Runtime session factory (model_store.runtime), used by the service and offline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from model_store.runtime import ort_session
from tests.conftest import REPO_ROOT


def _identity_model() -> bytes:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_sessions_are_configured_like_the_service(tmp_path: Path) -> None:
    session = ort_session(_identity_model(), threads=1)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.array([3.0], dtype=np.float32)
    assert session.run(None, {"x": x})[0] == x
    path = tmp_path / "m.onnx"
    path.write_bytes(_identity_model())
    ort_session(path, threads=None, optimized_model_path=tmp_path / "opt.onnx")
    assert (tmp_path / "opt.onnx").is_file()


def test_no_other_code_opens_a_session_of_its_own() -> None:
    pattern = re.compile(r"InferenceSession\(|SessionOptions\(")
    offenders = [
        str(p.relative_to(REPO_ROOT))
        for folder in ("app", "compression", "model_store", "recsys_cli", "benchmarks")
        for p in (REPO_ROOT / folder).rglob("*.py")
        if pattern.search(p.read_text()) and p.name != "runtime.py"
    ]
    assert not offenders, offenders
