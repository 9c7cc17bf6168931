"""Engine choice from a stored version's artifacts, and the PyTorch (safetensors) engine."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engines import EngineError, OrtEngine, TorchEngine, build_engine
from compression.configs import ModelConfig
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from compression.model.train import save_checkpoint
from recsys_cli.main import _torch_module

MAX_LEN = 8
CFG = ModelConfig(n_items=40, max_len=MAX_LEN, hidden=16, n_heads=2, n_blocks=1)
ARCH = CFG.model_dump()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = SASRec(CFG)
    root = tmp_path_factory.mktemp("engines")
    export_onnx(model, root / "model.onnx")
    save_checkpoint(root / "model.safetensors", model)
    (root / "model.pt").write_bytes(b"a legacy pickle checkpoint: never read")
    (root / "model.plan").write_bytes(b"not a real engine")
    return root


ONNX = {"model.onnx": {"format": "onnx"}}
CKPT = {"model.safetensors": {"format": "pytorch"}}
LEGACY = {"model.pt": {"format": "pytorch"}}
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
        (ONNX, "torch", "has no PyTorch checkpoint"),
        ({**ONNX, **LEGACY}, "torch", "pickle-based format this version never loads"),
        (LEGACY, "auto", "re-publish it with model.safetensors"),
        ({}, "auto", "has no ONNX model"),
    ],
)
def test_impossible_engine_choices_are_clear_errors(
    folder: Path, artifacts: dict, kind: str, message: str
) -> None:
    with pytest.raises(EngineError, match=message):
        build_engine(
            folder, artifacts, kind, 1, MAX_LEN, architecture=ARCH, torch_factory=_torch_module
        )


@pytest.mark.parametrize("kind, artifacts", [("torch", {**ONNX, **CKPT}), ("auto", CKPT)])
def test_the_torch_engine_needs_the_injected_module_factory(
    folder: Path, kind: str, artifacts: dict
) -> None:
    with pytest.raises(EngineError, match="needs a module factory"):
        build_engine(folder, artifacts, kind, 1, MAX_LEN, architecture=ARCH)
    engine = build_engine(
        folder, artifacts, kind, 1, MAX_LEN, architecture=ARCH, torch_factory=_torch_module
    )
    assert isinstance(engine, TorchEngine)


def test_weights_that_do_not_fit_the_architecture_are_refused(folder: Path) -> None:
    wider = {**ARCH, "hidden": 32}
    with pytest.raises(EngineError, match="not usable weights for this architecture"):
        build_engine(
            folder, CKPT, "torch", 1, MAX_LEN, architecture=wider, torch_factory=_torch_module
        )
    with pytest.raises(EngineError, match="cannot build the module"):
        build_engine(
            folder, CKPT, "torch", 1, MAX_LEN, architecture={**ARCH, "hidden": -1},
            torch_factory=_torch_module,
        )  # fmt: skip


def test_the_torch_engine_matches_onnx_runtime_and_pads_short_inputs(folder: Path) -> None:
    engine = build_engine(
        folder, {**ONNX, **CKPT}, "torch", 1, MAX_LEN, architecture=ARCH,
        torch_factory=_torch_module,
    )  # fmt: skip
    assert isinstance(engine, TorchEngine) and engine.name.startswith("torch-")
    ort = OrtEngine(folder / "model.onnx")
    ids = np.random.default_rng(0).integers(1, 41, size=(5, MAX_LEN)).astype(np.int64)
    np.testing.assert_allclose(engine.run(ids), ort.run(ids), atol=1e-4)
    short = ids[:, -3:]
    np.testing.assert_allclose(engine.run(short), ort.run(short), atol=1e-4)


def test_the_torch_engine_reads_architectures_recorded_before_options_were_retired(
    tmp_path: Path,
) -> None:
    model = SASRec(CFG).eval()
    save_checkpoint(tmp_path / "model.safetensors", model)
    # What a manifest of an older version records: retired options at their neutral value.
    old = {**CFG.model_dump(), "tied": True, "positions": "from_start", "shared_blocks": False}
    engine = TorchEngine(tmp_path / "model.safetensors", old, _torch_module, MAX_LEN, device="cpu")
    ids = np.random.default_rng(1).integers(1, 41, size=(4, MAX_LEN)).astype(np.int64)
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(engine.run(ids), want, atol=1e-5)
    with pytest.raises(Exception, match="shared_blocks=True, an option retired"):
        TorchEngine(
            tmp_path / "model.safetensors", {**old, "shared_blocks": True}, _torch_module,
            MAX_LEN, device="cpu",
        )  # fmt: skip
