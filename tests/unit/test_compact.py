"""Compact ONNX files: same scores, fewer bytes; context variants truncate in the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compression.configs import ModelConfig
from compression.export.compact import POSITION_TABLE, compact_file, shorten_context
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from compression.quantize.adaptive import quantize_int8
from compression.quantize.int8 import QuantizeConfig

MAX_LEN = 12


def exported(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=60, max_len=MAX_LEN, hidden=16, n_heads=2)
    path = tmp_path / "model.onnx"
    export_onnx(SASRec(cfg).eval(), path)
    return path


def scores(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"item_ids": ids})[0]


def batch(length: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(1, 61, size=(6, length))
    ids[:2, : length // 2] = 0  # left padding
    return ids


def test_compact_names_keeps_scores_and_shrinks(tmp_path: Path) -> None:
    src = exported(tmp_path)
    quantize_int8(src, tmp_path / "int8.onnx", QuantizeConfig(mode="dynamic"), max_len=MAX_LEN)
    for path in (src, tmp_path / "int8.onnx"):
        before, size = scores(path, batch(MAX_LEN)), path.stat().st_size
        compact_file(path)
        compact_file(path)  # again: already short names must not collide
        # Not bit-equal: without the shape annotations ONNX Runtime fuses one LayerNorm
        # fewer (SkipLayerNormalization needs the rank), which moves the last float bits.
        np.testing.assert_allclose(scores(path, batch(MAX_LEN)), before, rtol=0, atol=1e-6)
        assert path.stat().st_size < size
        graph = onnx.load(str(path)).graph
        assert not graph.value_info
        assert [v.name for v in graph.input] == ["item_ids"]
        assert [v.name for v in graph.output] == ["scores"]
        names = {t.name for t in graph.initializer}
        assert POSITION_TABLE in names  # named weights keep their names, generated ones not
        assert not [n for n in names if n.startswith(("onnx::", "/"))]


def test_context_is_cut_in_the_graph(tmp_path: Path) -> None:
    src = exported(tmp_path)
    short = tmp_path / "ctx5.onnx"
    short.write_bytes(src.read_bytes())
    changes = compact_file(short, max_len=5)
    assert any("truncated to the last 5" in c for c in changes)
    for length in (1, 3, 5):  # what the variant is fed: its own window
        np.testing.assert_allclose(
            scores(short, batch(length)), scores(src, batch(length)), rtol=1e-5, atol=1e-5
        )
    long = batch(MAX_LEN, seed=1)  # longer inputs: the graph keeps the last 5 items itself
    np.testing.assert_allclose(scores(short, long), scores(src, long[:, -5:]), rtol=1e-5, atol=1e-5)
    table = next(t for t in onnx.load(str(short)).graph.initializer if t.name == POSITION_TABLE)
    assert list(table.dims) == [5, 16]
    assert short.stat().st_size < src.stat().st_size


def test_context_without_the_input_slice_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(exported(tmp_path)))
    for node in model.graph.node:
        if node.op_type == "Slice" and node.input[0] == "item_ids":
            node.op_type, node.input[:] = "Identity", ["item_ids"]
    with pytest.raises(ValueError, match="re-export the model"):
        shorten_context(model, 5)
