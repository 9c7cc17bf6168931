"""4-bit weights for any scoring graph (`quantize_int4`), weight-only.

- **Block matrix products**: every `MatMul` with a constant 2-D weight goes through ONNX
  Runtime's own quantizer (`MatMulNBitsQuantizer`, symmetric int4): in blocks of `block_size`
  along the input dimension with one fp32 scale per block, run as `com.microsoft.MatMulNBits`;
  or (`block_size=None`) one scale per output column, as a standard-ONNX INT4
  `DequantizeLinear` before the `MatMul` (the quantizer writes per-column scales only so).
- **Item tables**: float matrices read by a `Gather` (the item and position embeddings) or
  by the output `Gemm(transB=1)` (the tied item matrix) become ONE standard-ONNX INT4
  initializer with one float16 scale per row and a `DequantizeLinear(axis=0)` in front of
  their readers, so a tied matrix stays one copy. Per row, as for int8
  (`quantize.item_matrix`): item vectors differ in norm.
- **The remaining float tensors** (biases, norms, the per-column scales) are stored as float16
  and cast back when the session loads: a 4-bit student is small enough for them to be 8% of
  its bytes.
- **A zero output bias** (`Gemm`'s C, all zeros in the exporter's graphs) is dropped.
- **Id tables**: int32/int64 tables read only by a `Gather` (the successor lists) whose values
  fit int16 are stored as int16 and cast back after the Gather.

The file says (metadata `recsys.fold_quantized_weights`) that its weights are to be folded to
float when a session loads it (`model_store.runtime.ort_session` does): 4 bits on disk and in
transit, float speed per call.

The graph is raised to opset 21 first (int4 tensors need it) with ONNX's version converter.
Block sizes (per column, 16-128) are compared on the ML-1M students by
`benchmarks/int4_check.py`; per column writes the fewest bytes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.export.files import (
    QuantizeError,
    atomic_output,
    load_scoring_model,
    prune_initializers,
    save_model,
    score_width,
)
from model_store.runtime import FOLD_WEIGHTS_KEY

INT4_OPSET = 21
INT4_QMAX = 7  # symmetric [-7, 7]: zero stays exact and no row scale is wasted on -8
BLOCK_SIZES = (16, 32, 64, 128)  # what MatMulNBits accepts: powers of two from 16
INT4_IR_VERSION = 10
DEFAULT_BLOCK_SIZE: int | None = None  # one scale per output column: the fewest bytes
MIN_TABLE_ELEMENTS = 1024  # smaller tables (biases, norms) cost more in scales than they save
MIN_HALF_ELEMENTS = 16  # a Cast node costs ~25 bytes; scalars stay float32


@dataclass(frozen=True)
class Int4Report:
    path: Path
    bytes_before: int
    bytes_after: int
    block_size: int | None  # None: one scale per output column
    matmuls: int  # MatMul nodes now MatMulNBits
    tables: tuple[str, ...]  # float tables stored as int4 rows
    narrowed: tuple[str, ...]  # id tables stored as int16


def quantize_rows_int4(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per row: values in [-7, 7] (held in int8), float16 scales.

    The scale is rounded to float16 BEFORE the values are rounded, so value * scale is
    exactly what the graph computes. An all-zero row (padding, id 0) gets scale 1.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise QuantizeError(f"int4 rows need a 2-D matrix, got shape {matrix.shape}")
    absmax = np.abs(matrix).max(axis=1)
    if not np.isfinite(absmax).all():
        raise QuantizeError("the matrix holds NaN or infinite values")
    if (absmax / INT4_QMAX > np.finfo(np.float16).max).any():
        raise QuantizeError(
            f"a row's largest value {absmax.max():.3g} needs a scale beyond float16; "
            "keep this table in float (int8 rows)"
        )
    scale = (absmax / INT4_QMAX).astype(np.float16)
    tiny = np.finfo(np.float16).smallest_subnormal
    scale[(absmax > 0) & (scale == 0)] = tiny  # rows too small for float16 keep their sign
    scale[absmax == 0] = 1.0
    q = np.clip(np.rint(matrix / scale.astype(np.float32)[:, None]), -INT4_QMAX, INT4_QMAX)
    return q.astype(np.int8), scale


def dequantize_rows_int4(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def _replace_initializer(graph: onnx.GraphProto, init: onnx.TensorProto) -> None:
    """Drop `init` (a node will write its name); older exports also list initializers as
    graph inputs, which would then be defined twice."""
    graph.initializer.remove(init)
    listed = [i for i in graph.input if i.name == init.name]
    for entry in listed:
        graph.input.remove(entry)


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers


def _attr(node: onnx.NodeProto, name: str, default: int | float) -> int | float:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _row_table(name: str, node: onnx.NodeProto) -> bool:
    """Does `node` read initializer `name` row by row (a row per item or position)?"""
    if node.op_type == "Gather":
        return node.input[0] == name and _attr(node, "axis", 0) == 0
    if node.op_type == "Gemm":
        return list(node.input[1:2]) == [name] and _attr(node, "transB", 0) == 1
    return False


def _raise_opset(model: onnx.ModelProto, src: Path) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= INT4_OPSET:
        model.ir_version = max(model.ir_version, INT4_IR_VERSION)
        return model
    from onnx import version_converter

    try:
        raised = version_converter.convert_version(model, INT4_OPSET)
    except Exception as exc:
        raise QuantizeError(f"{src}: cannot raise opset {opset} to {INT4_OPSET} ({exc})") from None
    # The converter keeps the graph's tensors; a graph it could not convert fails the check.
    try:
        onnx.checker.check_model(raised)
    except onnx.checker.ValidationError as exc:
        raise QuantizeError(f"{src}: opset {INT4_OPSET} graph is invalid ({exc})") from None
    raised.ir_version = max(raised.ir_version, INT4_IR_VERSION)
    return raised


def _matmul_nbits(model: onnx.ModelProto, block_size: int | None) -> tuple[onnx.ModelProto, int]:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def rewritten(m: onnx.ModelProto) -> int:  # MatMulNBits nodes, or DequantizeLinears
        return sum(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in m.graph.node)

    before = rewritten(model)
    logger = logging.getLogger(MatMulNBitsQuantizer.__module__)
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs a line per node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size or BLOCK_SIZES[0],
            is_symmetric=True,
            quant_format=QuantFormat.QDQ if block_size is None else QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",),
            channel_wised_quantize=block_size is None,
        )
        quantizer.process()
    except Exception as exc:  # an older onnxruntime, or a graph its quantizer cannot read
        import onnxruntime

        raise QuantizeError(
            f"ONNX Runtime {onnxruntime.__version__}'s MatMulNBits quantizer failed ({exc}); "
            "the project is tested with the version in requirements-dev.txt"
        ) from None
    finally:
        logger.setLevel(level)
    out = quantizer.model.model
    return out, rewritten(out) - before


def _int4_tables(model: onnx.ModelProto) -> list[str]:
    """Store every float row table as INT4 + float16 row scales behind a DequantizeLinear
    that writes the table's old name, so its readers stay as they are."""
    graph = model.graph
    readers = _readers(graph)
    done: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for init in list(graph.initializer):
        users = readers.get(init.name, [])
        small = int(np.prod(init.dims)) < MIN_TABLE_ELEMENTS
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2 or small or not users:
            continue
        if not all(_row_table(init.name, node) for node in users):
            continue
        q, scale = quantize_rows_int4(numpy_helper.to_array(init))
        q_name, s_name, s32 = f"{init.name}.int4_rows", f"{init.name}.row_scale", f"{init.name}.s32"
        _replace_initializer(graph, init)
        # ml_dtypes (an onnx dependency) packs two values per byte into raw_data.
        graph.initializer.append(numpy_helper.from_array(q.astype(ml_dtypes.int4), q_name))
        graph.initializer.append(numpy_helper.from_array(scale, s_name))
        nodes += [
            helper.make_node("Cast", [s_name], [s32], to=TensorProto.FLOAT, name=f"{s32}_cast"),
            helper.make_node(
                "DequantizeLinear", [q_name, s32], [init.name], axis=0, name=f"{q_name}_dq"
            ),
        ]
        done.append(init.name)
    # Constants first: the graph must stay topologically sorted.
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    return done


def _half_floats(model: onnx.ModelProto) -> int:
    """float32 initializers of at least MIN_HALF_ELEMENTS values (and every int4 scale) that
    float16 holds (finite, in range) become float16 + a Cast that writes the old name."""
    graph = model.graph
    casts: list[onnx.NodeProto] = []
    limit = float(np.finfo(np.float16).max)
    # Every int4 scale, however few: the fake quant of fine-tuning rounds them all.
    scales = {n.input[1] for n in graph.node if n.op_type == "DequantizeLinear"}
    scales |= {n.input[2] for n in graph.node if n.op_type == "MatMulNBits"}  # A, B, scales
    for init in list(graph.initializer):
        few = int(np.prod(init.dims)) < MIN_HALF_ELEMENTS and init.name not in scales
        if init.data_type != TensorProto.FLOAT or few:
            continue
        values = numpy_helper.to_array(init)
        if not np.isfinite(values).all() or np.abs(values).max() > limit:
            continue
        half = f"{init.name}.fp16"
        _replace_initializer(graph, init)
        graph.initializer.append(numpy_helper.from_array(values.astype(np.float16), half))
        casts.append(
            helper.make_node("Cast", [half], [init.name], to=TensorProto.FLOAT, name=f"{half}_cast")
        )
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + rest)
    return len(casts)


def _drop_zero_bias(model: onnx.ModelProto) -> None:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        if not numpy_helper.to_array(inits[node.input[2]]).any():
            del node.input[2]


def _narrow_id_tables(model: onnx.ModelProto) -> list[str]:
    """int32/int64 tables read only as Gather data, with values that fit int16."""
    graph = model.graph
    readers = _readers(graph)
    info = np.iinfo(np.int16)
    done: list[str] = []
    for init in list(graph.initializer):
        if init.data_type not in (TensorProto.INT32, TensorProto.INT64):
            continue
        users = readers.get(init.name, [])
        if not users or not all(n.op_type == "Gather" and n.input[0] == init.name for n in users):
            continue
        values = numpy_helper.to_array(init)
        if values.size < MIN_TABLE_ELEMENTS or values.min() < info.min or values.max() > info.max:
            continue
        narrow = f"{init.name}.int16"
        _replace_initializer(graph, init)
        graph.initializer.append(numpy_helper.from_array(values.astype(np.int16), narrow))
        for k, node in enumerate(users):
            node.input[0] = narrow
            wide, out = f"{node.output[0]}.int16", node.output[0]
            node.output[0] = wide
            cast = helper.make_node(
                "Cast", [wide], [out], to=init.data_type, name=f"{narrow}_widen{k}"
            )
            graph.node.insert(list(graph.node).index(node) + 1, cast)
        done.append(init.name)
    return done


def quantize_int4(
    src: str | Path, dst: str | Path, block_size: int | None = DEFAULT_BLOCK_SIZE
) -> Int4Report:
    """Write `src` with 4-bit weights to `dst` (module docstring); the result is checked to
    load and score before it replaces `dst`."""
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise QuantizeError(
            f"block_size={block_size}: MatMulNBits takes one of {BLOCK_SIZES} (or None: one "
            "scale per output column)"
        )
    src, dst = Path(src), Path(dst)
    model = load_scoring_model(src)
    n_scores = score_width(model, src)
    model = _raise_opset(model, src)
    model, matmuls = _matmul_nbits(model, block_size)
    tables = _int4_tables(model)
    if not matmuls and not tables:
        raise QuantizeError(
            f"{src}: no float MatMul weight and no float item table found; was it already "
            "quantized?"
        )
    _drop_zero_bias(model)
    narrowed = _narrow_id_tables(model)
    prune_initializers(model.graph)  # before the casts, which would read what nothing needs
    _half_floats(model)
    # 4 bits on disk, float weights once loaded: see model_store.runtime.FOLD_WEIGHTS_KEY.
    onnx.helper.set_model_props(model, {FOLD_WEIGHTS_KEY: "1"})
    with atomic_output(dst, n_scores) as tmp:
        save_model(model, tmp)
    return Int4Report(
        path=dst,
        bytes_before=src.stat().st_size,
        bytes_after=dst.stat().st_size,
        block_size=block_size,
        matmuls=matmuls,
        tables=tuple(tables),
        narrowed=tuple(narrowed),
    )
