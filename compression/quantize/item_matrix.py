"""The item-embedding matrix as int8 with one fp32 scale per row (`quantize_item_matrix`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compression.export.compact import constant_value
from compression.export.exporter import OUTPUT_NAME
from compression.export.files import (
    QuantizeError,
    atomic_output,
    load_scoring_model,
    producer_map,
    prune_initializers,
    save_model,
    score_width,
)
from compression.quantize.cpu_int8 import int8_needs_reduce_range

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class ItemMatrixReport:
    path: Path
    bytes_before: int
    bytes_after: int
    rows: int  # n_items + 1
    dim: int
    shared: bool  # one int8 matrix serves both the Gather and the output product
    gather_quantized: bool
    output_quantized: bool
    output_compute: str
    row_bits: int  # 8: values in [-127, 127]; 7: [-63, 63] (CPUs whose u8 x s8 saturates)


def quantize_rows(matrix: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row| / qmax, values in [-qmax, qmax], qmax = 127
    (`bits=8`) or 63 (`bits=7`).

    Per row because item vectors differ in norm (popular items grow larger): one scale for
    the whole matrix would spend most of the 8 bits on the few largest rows. An all-zero row
    (padding, id 0) gets scale 1 so nothing divides by zero.
    """
    if bits not in (7, 8):
        raise ValueError(f"bits={bits}: int8 rows hold 7 or 8 bits")
    qmax = 2 ** (bits - 1) - 1
    matrix = np.asarray(matrix, dtype=np.float32)
    scale = np.abs(matrix).max(axis=1) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(matrix / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def _static_rank(model: onnx.ModelProto, name: str) -> int | None:
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def quantize_item_matrix(
    src: str | Path,
    dst: str | Path,
    output_compute: Literal["int8", "float"] = "int8",
    reduce_range: bool | None = None,
) -> ItemMatrixReport:
    """Store the item-embedding matrix as int8 with one fp32 scale per row.

    The exporter writes the tied matrix twice (`[V, d]` for the input Gather, its transpose
    `[d, V]` for the output MatMul), together ~95% of a teacher's bytes. Both become ONE int8
    `[V, d]` initializer plus `[V]` fp32 scales (~8x smaller for that part):

    - input side: `Gather` of int8 rows, `Cast`, times the gathered row scales. Only the rows
      of the request are dequantized, never the whole matrix.
    - output side, `output_compute="int8"` (default): `DynamicQuantizeLinear` of the query
      (uint8, per call) and `com.microsoft.QGemm(transB=1)` against the int8 rows with their
      per-row scales - an int8 product, as fast as fp32 at batch 1 on this CPU. `"float"`:
      `DequantizeLinear(axis=0)` + `Gemm(transB=1)`, standard ONNX only (for execution
      providers without Microsoft ops), but it dequantizes the whole matrix on every call
      (1.5-2.5x the fp32 latency at batch 1 on the Beauty teacher, measured twice).

    `reduce_range` stores 7-bit rows ([-63, 63]) so QGemm's u8 x s8 products cannot saturate
    on x86 CPUs without VNNI (`compression.quantize.cpu_int8`); None (default) decides by this CPU
    when the output product is int8, and keeps 8 bits for `"float"`, which dequantizes
    exactly. 8-bit rows on this AVX2-only EPYC moved a small model's scores by 0.37.

    Beauty teacher (12,102 x 64): 6.51 MB -> 1.15 MB, top-10 agreement with fp32 0.988 (int8
    output) / 0.991 (float output) on 2,000 validation histories; then dynamic: 0.96 MB.

    Untied models (separate output matrix) get two int8 matrices. Order with dynamic
    quantization: item matrix FIRST, then `quantize_dynamic_int8` (it leaves QGemm/Gemm alone
    and quantizes the block MatMuls) - one shared int8 matrix with per-row scales. The other
    order also works, but the output MatMul is then already int8 (ORT's per-tensor scale) and
    only the Gather's copy is converted here, so two int8 copies remain.
    """
    src, dst = Path(src), Path(dst)
    model = load_scoring_model(src)
    graph = model.graph
    n_rows = score_width(model, src)
    inits = {i.name: i for i in graph.initializer}
    floats = {n: i for n, i in inits.items() if i.data_type == TensorProto.FLOAT}

    producers = producer_map(graph)
    out_node = producers[OUTPUT_NAME]
    # The scores before successor lists add to them (compression/model/successors.py).
    scores_name = OUTPUT_NAME
    if out_node.op_type == "ScatterElements":
        scores_name = out_node.input[0]
        out_node = producers[scores_name]
    out_matrix: np.ndarray | None = None
    out_bias: str | None = None
    if out_node.op_type == "Gemm" and len(out_node.input) > 1 and out_node.input[1] in floats:
        # Current exports: Gemm(query, item_matrix, zero bias, transB=1) on the Gather's own
        # initializer (one copy of the matrix).
        attrs = {a.name: helper.get_attribute_value(a) for a in out_node.attribute}
        weight = numpy_helper.to_array(floats[out_node.input[1]])
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
        if plain and attrs.get("transB", 0) == 1 and weight.ndim == 2 and weight.shape[0] == n_rows:
            out_matrix = weight
            if len(out_node.input) > 2 and out_node.input[2]:
                bias = constant_value(graph, out_node.input[2])
                is_zero = bias is not None and not bias.any()
                if not is_zero or attrs.get("beta", 1.0) != 1.0:
                    out_bias = out_node.input[2]
    elif out_node.op_type == "MatMul" and out_node.input[1] in floats:
        weight = numpy_helper.to_array(floats[out_node.input[1]])
        if weight.ndim == 2 and weight.shape[1] == n_rows:
            out_matrix = weight.T
            rank = _static_rank(model, out_node.input[0])
            if rank != 2:
                raise QuantizeError(
                    f"{src}: the output MatMul's query has rank {rank}, expected 2 "
                    "([batch, dim]); cannot rewrite it as a Gemm"
                )
    gathers = []
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in floats:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = list(floats[node.input[0]].dims)
        fits = out_matrix is None or dims[1:] == [out_matrix.shape[1]]
        if axis == 0 and len(dims) == 2 and dims[0] == n_rows and fits:
            gathers.append(node)
    if len(gathers) > 1:
        names = [g.name for g in gathers]
        raise QuantizeError(f"{src}: several Gathers read a [{n_rows}, d] matrix: {names}")
    gather = gathers[0] if gathers else None
    if gather is None and out_matrix is None:
        raise QuantizeError(
            f"{src}: no fp32 item matrix found (neither an item Gather nor an fp32 output "
            "MatMul); was it already quantized, or is its item matrix computed from smaller "
            "factors? Use mode=dynamic alone"
        )
    emb = numpy_helper.to_array(floats[gather.input[0]]) if gather is not None else None
    shared = emb is not None and out_matrix is not None and np.array_equal(emb, out_matrix)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise QuantizeError(f"{src}: opset {opset} < 13 (per-axis DequantizeLinear)")

    int8_product = output_compute == "int8" and out_matrix is not None
    if reduce_range is None:
        reduce_range = int8_product and int8_needs_reduce_range()
    bits = 7 if reduce_range else 8
    new_inits: list[TensorProto] = []

    def add_matrix(matrix: np.ndarray, base: str) -> tuple[str, str]:
        q, scale = quantize_rows(matrix, bits)
        q_name, s_name = f"{base}.int8_rows", f"{base}.row_scale"
        new_inits.extend(
            [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
        )
        return q_name, s_name

    gather_names = add_matrix(emb, gather.input[0]) if emb is not None else None
    if out_matrix is not None:
        out_names = gather_names if shared else add_matrix(out_matrix, out_node.input[1])
    axes_name = "item_matrix.unsqueeze_axes"
    if gather is not None:
        new_inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_name))

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node is gather and gather_names is not None:
            q_name, s_name = gather_names
            ids, out, p = node.input[1], node.output[0], f"{node.name}_int8"
            nodes += [
                helper.make_node("Gather", [q_name, ids], [f"{p}_rows"], name=f"{p}_rows"),
                helper.make_node("Gather", [s_name, ids], [f"{p}_scale"], name=f"{p}_scale"),
                helper.make_node(
                    "Unsqueeze", [f"{p}_scale", axes_name], [f"{p}_scale3"], name=f"{p}_unsq"
                ),
                helper.make_node(
                    "Cast", [f"{p}_rows"], [f"{p}_float"], to=TensorProto.FLOAT, name=f"{p}_cast"
                ),
                helper.make_node("Mul", [f"{p}_float", f"{p}_scale3"], [out], name=f"{p}_mul"),
            ]
        elif node is out_node and out_matrix is not None:
            q_name, s_name = out_names
            query, p = node.input[0], f"{node.name}_int8"
            product = scores_name if out_bias is None else f"{p}_product"
            if output_compute == "int8":
                # QGemm requires B's zero point: zeros, one per item (symmetric rows).
                zero_name = f"{q_name}.zero"
                zeros = np.zeros(n_rows, dtype=np.int8)
                new_inits.append(numpy_helper.from_array(zeros, zero_name))
                nodes += [
                    helper.make_node(
                        "DynamicQuantizeLinear",
                        [query],
                        [f"{p}_q", f"{p}_qscale", f"{p}_qzero"],
                        name=f"{p}_quant_query",
                    ),
                    helper.make_node(
                        "QGemm",
                        [f"{p}_q", f"{p}_qscale", f"{p}_qzero", q_name, s_name, zero_name],
                        [product],
                        name=f"{p}_qgemm",
                        domain=MS_DOMAIN,
                        transB=1,
                    ),
                ]
            else:
                nodes += [
                    helper.make_node(
                        "DequantizeLinear", [q_name, s_name], [f"{p}_deq"], name=f"{p}_dq", axis=0
                    ),
                    helper.make_node(
                        "Gemm", [query, f"{p}_deq"], [product], name=f"{p}_gemm", transB=1
                    ),
                ]
            if out_bias is not None:
                nodes.append(
                    helper.make_node("Add", [product, out_bias], [scores_name], name=f"{p}_bias")
                )
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    prune_initializers(graph)
    if int8_product and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    with atomic_output(dst, n_rows) as tmp:
        save_model(model, tmp)
    return ItemMatrixReport(
        path=dst,
        bytes_before=src.stat().st_size,
        bytes_after=dst.stat().st_size,
        rows=n_rows,
        dim=int((emb if emb is not None else out_matrix).shape[1]),  # type: ignore[union-attr]
        shared=shared,
        gather_quantized=gather is not None,
        output_quantized=out_matrix is not None,
        output_compute=output_compute if out_matrix is not None else "unchanged",
        row_bits=bits,
    )
