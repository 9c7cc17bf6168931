"""Helpers for two-stage tests: a tiny user-vector ONNX model and a published variant.

The model is the mean of the history's item embeddings (padding 0 ignored), written with the
`onnx` helper API, so serving tests need neither torch nor `compression`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from model_store import Manifest, ModelStore
from model_store.two_stage import publish_two_stage


def mean_embedding_onnx(path: Path, table: np.ndarray) -> Path:
    """`item_ids [batch, length]` -> `user_vector [batch, dim]`: mean of table[id], id > 0."""
    dim = table.shape[1]
    nodes = [
        helper.make_node("Gather", ["table", "item_ids"], ["emb"]),  # row 0 is zero
        helper.make_node("ReduceSum", ["emb", "axis1"], ["total"], keepdims=0),
        helper.make_node("Greater", ["item_ids", "zero"], ["known"]),
        helper.make_node("Cast", ["known"], ["knownf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["knownf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["total", "safe"], ["user_vector"]),
    ]
    inits = [
        numpy_helper.from_array(np.asarray(table, dtype=np.float32), "table"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_embedding",
        [helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["batch", "length"])],
        [helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["batch", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def mean_user_vectors(table: np.ndarray, histories: list[list[int]]) -> np.ndarray:
    """What `mean_embedding_onnx` returns, computed in numpy."""
    return np.stack([table[h].mean(axis=0) for h in histories]).astype(np.float32)


def publish_two_stage_variant(
    store: ModelStore,
    name: str,
    table: np.ndarray,
    item_ids: list[str],
    max_len: int = 8,
    **options: Any,
) -> Manifest:
    """Publish `table` (`[n_items + 1, dim]`, row 0 zero) as both the user model's embedding
    and the item matrix; `options` go to `publish_two_stage` (precision, index, block_rows)."""
    n_items = table.shape[0] - 1
    build = store.root.parent / f"build-{name}"
    build.mkdir(parents=True, exist_ok=True)
    onnx_path = mean_embedding_onnx(build / "model.onnx", table)
    items = build / "items.json"
    counts = list(range(n_items, 0, -1))
    items.write_text(
        json.dumps({"format": "recsys-item-mapping/1", "item_ids": item_ids, "counts": counts})
    )
    return publish_two_stage(
        store,
        name,
        user_model=onnx_path,
        item_ids=items,
        item_matrix=table,
        kind="two-stage",
        parent=None,
        architecture={"max_len": max_len, "dim": table.shape[1]},
        recipe={},
        dataset={
            "name": "synthetic",
            "sha256": "0" * 64,
            "n_users": 1,
            "n_items": n_items,
            "n_interactions": 1,
        },
        metrics={},
        **options,
    )
