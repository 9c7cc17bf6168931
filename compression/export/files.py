"""Reading, describing and safely writing the ONNX files of model variants.

Every variant writer (`compression.quantize`: `int8`, `adaptive`, `item_matrix`, `fp16`) reads
a file written by `compression.export.exporter.export_onnx` (`item_ids` int64
`[batch, length]` in, `scores` float32 `[batch, n_items + 1]` out) and writes one with the
same signature, so the serving code never needs to know which variant it loaded. Writers go through
`atomic_output`: the new file is loaded in ONNX Runtime and scores a tiny batch before it is
renamed into place, so a failed or broken conversion never leaves a half-written or
unloadable model behind.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from model_store.runtime import ort_session

# Op types whose presence means a node computes in integer arithmetic.
_INT8_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}
)
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
ScorerEval = Callable[[Path], float]  # ONNX file -> validation NDCG@10


class QuantizeError(ValueError):
    """A model that cannot be quantized or converted; the message names the file."""


@dataclass(frozen=True)
class ModelSummary:
    """What a variant costs and which of its matrix products still run in float."""

    path: Path
    bytes: int
    op_counts: dict[str, int]
    initializer_bytes: dict[str, int]  # by element type name, e.g. {"FLOAT": ..., "INT8": ...}
    float_matmuls: tuple[str, ...]  # MatMul/Gemm nodes whose inputs are not dequantized int8
    int8_matmuls: int  # integer kernels plus MatMul/Gemm fed by DequantizeLinear (QDQ)


def file_size_bytes(path: str | Path) -> int:
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path}: no such file")
    return path.stat().st_size


def load_scoring_model(path: str | Path) -> onnx.ModelProto:
    """Load and check the exported signature; anything else is a QuantizeError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"{path}: no such file; export the model first")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError, onnx others
        raise QuantizeError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    if not graph.node:
        raise QuantizeError(f"{path}: not an ONNX model (no graph nodes)")
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    outputs = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    if inputs.get(INPUT_NAME) != TensorProto.INT64 or outputs.get(OUTPUT_NAME) != TensorProto.FLOAT:
        raise QuantizeError(
            f"{path}: expected input {INPUT_NAME!r} int64 and output {OUTPUT_NAME!r} float32 "
            f"(compression.export.exporter), found inputs {sorted(inputs)} and outputs "
            f"{sorted(outputs)}"
        )
    return model


def score_width(model: onnx.ModelProto, path: Path) -> int:
    """Static width of `scores` (n_items + 1): the exporter writes it as a fixed dimension."""
    out = next(o for o in model.graph.output if o.name == OUTPUT_NAME)
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise QuantizeError(f"{path}: {OUTPUT_NAME!r} has no static [batch, n_items + 1] shape")
    return int(dims[1].dim_value)


def producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def describe(path: str | Path) -> ModelSummary:
    """Bytes, op counts, initializer bytes by type, and which matrix products stay float."""
    path = Path(path)
    model = load_scoring_model(path)
    graph = model.graph
    producers = producer_map(graph)
    init_bytes: Counter[str] = Counter()
    for init in graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        init_bytes[TensorProto.DataType.Name(init.data_type)] += int(np.prod(init.dims)) * itemsize
    float_mm, int8_mm = [], 0
    for node in graph.node:
        if node.op_type in _INT8_OPS:
            int8_mm += 1
        elif node.op_type in MATMUL_OPS:
            fed_by_dq = any(
                producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                for i in node.input
            )
            if fed_by_dq:
                int8_mm += 1
            else:
                float_mm.append(node.name)
    return ModelSummary(
        path=path,
        bytes=path.stat().st_size,
        op_counts=dict(Counter(n.op_type for n in graph.node)),
        initializer_bytes=dict(init_bytes),
        float_matmuls=tuple(float_mm),
        int8_matmuls=int8_mm,
    )


def _smoke_check(tmp: Path, dst: Path, n_scores: int) -> None:
    """Load the written file in ORT and score two tiny histories (one padded)."""
    try:
        session = ort_session(tmp, threads=1)
        ids = np.array([[0, 1, 1], [1, 1, 1]], dtype=np.int64)
        (scores,) = session.run([OUTPUT_NAME], {INPUT_NAME: ids})
    except Exception as exc:
        raise QuantizeError(
            f"{dst}: the converted model does not run in ONNX Runtime ({exc}); nothing written"
        ) from None
    if scores.dtype != np.float32 or scores.shape != (2, n_scores):
        raise QuantizeError(
            f"{dst}: the converted model returns {scores.dtype} {scores.shape}, expected "
            f"float32 (2, {n_scores}); nothing written"
        )
    if not np.isfinite(scores).all():
        raise QuantizeError(f"{dst}: the converted model returns non-finite scores")


@contextlib.contextmanager
def atomic_output(dst: str | Path, n_scores: int) -> Iterator[Path]:
    """Yield a temporary path next to `dst`; on success check it runs, then rename."""
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise QuantizeError(f"{dst}: folder {dst.parent} does not exist")
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise QuantizeError(f"{dst}: the converter wrote nothing")
        _smoke_check(tmp, dst, n_scores)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes nothing reads (ORT warns about each one)."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    dead = [init for init in graph.initializer if init.name not in used]
    for init in dead:
        graph.initializer.remove(init)
    unused = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in unused:
        graph.node.remove(node)


def run_scores(session: Any, batches: Sequence[np.ndarray]) -> np.ndarray:
    """`scores` of every batch, stacked."""
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in batches])
