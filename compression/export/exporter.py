"""ONNX export with dynamic batch and length axes, checked against PyTorch on real sequences.

The graph takes `item_ids` (int64 `[batch, length]`, internal ids, left-padded with 0, oldest
first; longer histories are cut to the model's window inside the graph) and returns `scores`
(float32 `[batch, n_items + 1]`, column = internal item id, column 0 is padding). Only the
last position is computed in the last block (see `SASRec.forward`). The graph is written node
by node (`compression.export.graph`); PyTorch's exporter remains for models that writer does not
cover and on request (`writer="torch"`). Either way the file is checked against PyTorch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from compression.evaluate.metrics import agreement, scored_batches, torch_scorer
from compression.export import graph as onnx_graph
from compression.model.sasrec import SASRec
from model_store.runtime import ort_session

INPUT_NAME = "item_ids"
OUTPUT_NAME = "scores"
USER_VECTOR_NAME = "user_vector"  # the output of a two-stage variant's model
OPSET = 17


class ExportError(RuntimeError):
    """An exported graph that does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ParityReport:
    sequences: int
    max_abs_diff: float
    top10_agreement: float  # mean overlap of the two top-10 lists, 1.0 = identical

    def as_metrics(self) -> dict[str, float]:
        return {
            "parity_max_abs_diff": self.max_abs_diff,
            "parity_top10_agreement": self.top10_agreement,
        }


def export_user_model(model: SASRec, path: Path, histories: Sequence[np.ndarray]) -> float:
    """Write the two-stage user model (`item_ids -> user_vector`) to `path`, checked against
    PyTorch on `histories`; returns the largest difference (raises ExportError above 1e-3)."""
    model = model.eval()
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(onnx_graph.build(model, INPUT_NAME, USER_VECTOR_NAME, user_vector=True), str(tmp))
    session = ort_session(tmp, threads=None)

    def got(batch: np.ndarray) -> np.ndarray:
        return session.run([USER_VECTOR_NAME], {INPUT_NAME: batch})[0]

    def want(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.user_vector(torch.from_numpy(batch)).float().numpy()

    worst = 0.0
    for _, (a, b) in scored_batches(lambda x: (got(x), want(x)), histories, model.cfg.max_len):
        worst = max(worst, float(np.abs(a - b).max()))
    if worst > 1e-3:
        tmp.unlink()
        raise ExportError(f"{path}: user vectors differ from PyTorch by up to {worst:.2e}")
    tmp.replace(path)
    return worst


def export_onnx(model: SASRec, path: Path, writer: Literal["graph", "torch"] = "graph") -> None:
    """Write `model` as ONNX to `path` (written to a temporary name, then renamed).

    `writer="graph"` writes the graph node by node (`compression.export.graph`: fewer nodes,
    faster per call); models it does not cover, and `writer="torch"`, go through PyTorch's
    exporter.
    """
    if writer not in ("graph", "torch"):
        raise ValueError(f"writer={writer!r}: expected 'graph' or 'torch'")
    model = model.eval()
    tmp = path.with_name(path.name + ".tmp")
    if writer == "graph" and onnx_graph.supports(model):
        onnx.save(onnx_graph.build(model, INPUT_NAME, OUTPUT_NAME), str(tmp))
        tmp.replace(path)
        return
    example = torch.randint(1, model.cfg.n_items + 1, (2, min(8, model.cfg.max_len)))
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo exporter,
        # which needs `onnxscript`; this one needs nothing more and exports this model exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "length"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    tmp.replace(path)


def check_parity(
    model: SASRec,
    onnx_path: Path,
    histories: Sequence[np.ndarray],
    batch_size: int = 64,
    max_abs_diff: float = 1e-3,
    min_top10_agreement: float = 0.99,
) -> ParityReport:
    """Run both on the same histories; raise ExportError when the graph drifts."""
    session = ort_session(onnx_path, threads=None)

    def got(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    worst, agree = agreement(
        got, torch_scorer(model.eval()), histories, model.cfg.max_len, batch_size
    )
    report = ParityReport(len(histories), worst, agree)
    if report.max_abs_diff > max_abs_diff or report.top10_agreement < min_top10_agreement:
        raise ExportError(
            f"{onnx_path}: ONNX output differs from PyTorch on {report.sequences} sequences "
            f"(max |diff| {report.max_abs_diff:.2e} > {max_abs_diff:.0e} or top-10 agreement "
            f"{report.top10_agreement:.4f} < {min_top10_agreement})"
        )
    return report
