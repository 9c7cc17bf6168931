"""Engine choice from a stored version's artifacts, and the torch.export engine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engines import EngineError, OrtEngine, TorchEngine, build_engine
from compression.configs import ModelConfig
from compression.export import export_onnx, export_program
from compression.model import SASRec

MAX_LEN = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = SASRec(ModelConfig(n_items=40, max_len=MAX_LEN, hidden=16, n_heads=2, n_blocks=1))
    root = tmp_path_factory.mktemp("engines")
    export_onnx(model, root / "model.onnx")
    export_program(model, root / "model.pt2")
    (root / "model.plan").write_bytes(b"not a real engine")
    return root


ONNX = {"model.onnx": {"format": "onnx"}}
PT2 = {"model.pt2": {"format": "other"}}
PLAN = {"model.plan": {"format": "tensorrt", "tensorrt_version": "10.0.1",
                       "compute_capability": "9.0"}}  # fmt: skip


def test_a_plan_that_cannot_run_here_falls_back_to_onnx_and_says_why(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        engine = build_engine(folder, {**ONNX, **PLAN}, "auto", 1, MAX_LEN)
    assert isinstance(engine, OrtEngine) and engine.name == "onnxruntime-cpu"
    assert "not using the TensorRT engine" in caplog.text


@pytest.mark.parametrize(
    "artifacts, kind, message",
    [
        (PLAN, "auto", "cannot run this TensorRT engine"),
        ({**ONNX, **PLAN}, "tensorrt", "cannot run this TensorRT engine"),
        (ONNX, "tensorrt", "has no TensorRT engine"),
        (ONNX, "torch", "has no torch.export program"),
        ({}, "auto", "has no ONNX model"),
    ],
)
def test_impossible_engine_choices_are_clear_errors(
    folder: Path, artifacts: dict, kind: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        build_engine(folder, artifacts, kind, 1, MAX_LEN)


def test_the_torch_program_engine_matches_onnx_runtime_and_pads_short_inputs(
    folder: Path,
) -> None:
    engine = build_engine(folder, {**ONNX, **PT2}, "torch", 1, MAX_LEN)
    assert isinstance(engine, TorchEngine) and engine.name.startswith("torch-")
    ort = OrtEngine(folder / "model.onnx")
    ids = np.random.default_rng(0).integers(1, 41, size=(5, MAX_LEN)).astype(np.int64)
    np.testing.assert_allclose(engine.run(ids), ort.run(ids), atol=1e-4)
    short = ids[:, -3:]
    np.testing.assert_allclose(engine.run(short), ort.run(short), atol=1e-4)
