"""Mask and top-k of a batch of score rows in one ONNX Runtime call, after any engine.

Measured on ML-1M (3,417 columns, batch 32, one thread): numpy's `argpartition` took 1.1 ms,
as long as the INT8 student's whole forward pass, and held the GIL the event loop needs;
ONNX Runtime's ScatterElements + TopK take 0.13 ms with the GIL released.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from model_store.runtime import ort_session

OPSET = 17


def ranking_graph() -> bytes:
    """scores [B, N], exclude [B, H] (column ids, padded with 0), k [1] -> top-k per row.

    Excluded columns get -inf before TopK; column 0 is the padding id, so padding `exclude`
    with 0 masks nothing that could be recommended.
    """
    neg_inf = helper.make_tensor("neg_inf", TensorProto.FLOAT, [1], [-np.inf])
    nodes = [
        helper.make_node("Shape", ["exclude"], ["exclude_shape"]),
        helper.make_node("ConstantOfShape", ["exclude_shape"], ["minus_inf"], value=neg_inf),
        helper.make_node("ScatterElements", ["scores", "exclude", "minus_inf"], ["masked"], axis=1),
        helper.make_node(
            "TopK", ["masked", "k"], ["top_scores", "top_ids"], axis=1, largest=1, sorted=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "rank",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "columns"]),
            helper.make_tensor_value_info("exclude", TensorProto.INT64, ["batch", "excluded"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["batch", "k"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    return model.SerializeToString()


class Ranker:
    """Top-k columns of each score row, with per-row exclusions and column 0 never chosen."""

    def __init__(self, threads: int = 1) -> None:
        self._session = ort_session(ranking_graph(), threads)

    def top_k(
        self, scores: np.ndarray, exclude: Sequence[np.ndarray | None], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(top_scores, top_ids), each [B, k], best first; masked picks score -inf."""
        width = 1 + max((len(e) for e in exclude if e is not None), default=0)
        excluded = np.zeros((len(exclude), width), dtype=np.int64)
        for row, ids in enumerate(exclude):
            if ids is not None and len(ids):
                excluded[row, 1 : 1 + len(ids)] = ids
        k = min(k, scores.shape[1])
        top_scores, top_ids = self._session.run(
            None,
            {
                "scores": np.ascontiguousarray(scores, dtype=np.float32),
                "exclude": excluded,
                "k": np.array([k], dtype=np.int64),
            },
        )
        return top_scores, top_ids
