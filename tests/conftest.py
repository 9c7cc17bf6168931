"""Shared fixtures and helpers: real-data folder (skip when absent), GPU detection, ORT folding."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import onnx

    from compression.configs import ModelConfig
    from compression.data.sequences import Split
    from compression.model.sasrec import SASRec

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real data sets are never committed (their licences forbid it): read them by path.
SHARED_DATA = Path(os.environ.get("RECSYS_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}; set RECSYS_DATA_DIR to run")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def ort_optimized_graph(path: Path, tmp_path: Path) -> onnx.GraphProto:
    """The graph ONNX Runtime runs for `path` after its basic (constant-folding) passes."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def export_with_parity(model: SASRec, path: Path) -> None:
    """Export `model` to `path` and check its scores against PyTorch on 40 random
    histories of 1-29 items, odd batch size included."""
    import numpy as np

    from compression.export.exporter import check_parity, export_onnx

    export_onnx(model, path)
    n_items = model.cfg.n_items
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, n_items + 1, size=rng.integers(1, 30)) for _ in range(40)]
    report = check_parity(model, path, histories, batch_size=7)
    assert report.max_abs_diff < 1e-4 and report.top10_agreement == 1.0


def quick_train(
    cfg: ModelConfig, split: Split, epochs: int, init_model: SASRec | None = None
) -> SASRec:
    """A few quiet epochs on one thread in fp32 (lr 5e-3, batch 64): weights with structure
    for export and quantization tests."""
    from compression.configs import TrainConfig
    from compression.model.train import train

    train_cfg = TrainConfig(max_epochs=epochs, lr=5e-3, batch_size=64, threads=1)
    return train(
        cfg, train_cfg, split, progress=False, log=lambda _: None, init_model=init_model
    ).model
