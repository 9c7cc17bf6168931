"""INT8 variants of an exported SASRec graph with ONNX Runtime's own quantizers.

- `quantize_dynamic_int8`: int8 weights, activations quantized at run time
  (`onnxruntime.quantization.quantize_dynamic`). `../shared/DESIGN.md` §8 measured it the
  fastest and most accurate INT8 mode on this CPU, so it is the default.
- `quantize_static_int8`: QDQ format with activation ranges calibrated on training sequences.
- What a recipe's [quantize] table selects, the adaptive search included, is
  `compression.quantize.adaptive.quantize_int8`.

The item-embedding matrix has its own int8 format (`compression.quantize.item_matrix`), float16 its
own module (`compression.quantize.fp16`); file handling is shared (`compression.export.files`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compression.data.sequences import pad_left
from compression.export.compact import constant_value
from compression.export.exporter import INPUT_NAME
from compression.export.files import (
    MATMUL_OPS,
    ModelSummary,
    QuantizeError,
    atomic_output,
    describe,
    load_scoring_model,
    prune_initializers,
    save_model,
    score_width,
)


class QuantizeConfig(BaseModel):
    """How to quantize to INT8 with ONNX Runtime. Unknown keys and impossible values are refused.

    Defaults follow what was measured on a 2-core AVX-512/VNNI CPU (DESIGN §8): dynamic
    quantization of the MatMuls with a constant weight; static QDQ only of those MatMuls too,
    because quantizing every op type (or the activation x activation attention MatMuls) was
    the slowest and least accurate recipe. `reduce_range` stays off even on an AVX2-only
    CPU, where u8 x s8 sums can saturate: on the ML-1M teacher (2,000 validation histories,
    `benchmarks/int8_saturation.py`) 7-bit weights lowered top-10 agreement with fp32 from
    0.971 to 0.951 (dynamic) and 0.962 to 0.937 (static), NDCG@10 within noise. The item
    rows' QGemm is the exception (`quantize_item_matrix`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = Field(False, description="one weight scale per output column")
    reduce_range: bool = Field(
        False,
        description="7-bit weights, which cannot overflow the int16 sums of CPUs without "
        "VNNI (compression.quantize.cpu_int8); off: on the ML-1M teacher 8 bits kept more top-10 "
        "agreement even there",
    )
    op_types: tuple[str, ...] | None = Field(
        None,
        description="op types to quantize; None = MatMul (dynamic) or MatMul + Gemm (static). "
        "ORT's dynamic quantizer has no Gemm kernel, so Gemm is refused for dynamic",
    )
    nodes_to_exclude: tuple[str, ...] = Field(
        (), description="node names (of the pre-processed graph) always kept in float"
    )
    # static only
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_sequences: int = Field(256, ge=1, description="training histories to calibrate")
    calibration_batch_size: int = Field(32, ge=1)
    entropy_bins: int = Field(
        512, ge=256, le=8192, description="histogram bins of the entropy (KL) calibration"
    )
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="uint8 activations + int8 weights is ORT's advice for x86 CPUs"
    )
    matmul_const_b_only: bool = Field(
        True, description="static: quantize only MatMuls whose second input is a weight"
    )
    seed: int = Field(0, description="which training histories calibrate")
    # adaptive
    adaptive: bool = Field(False, description="keep the most harmful nodes in float")
    max_ndcg_loss: float = Field(
        0.01, ge=0.0, lt=1.0, description="relative validation NDCG@10 loss allowed vs fp32"
    )
    proxy_sequences: int = Field(
        256, ge=1, description="validation histories for the cheap per-node ranking"
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

        if self.mode == "dynamic":
            static_only = self.model_fields_set & {
                "calibration",
                "calibration_sequences",
                "calibration_batch_size",
                "entropy_bins",
                "activation_type",
                "matmul_const_b_only",
            }
            if static_only:
                raise ValueError(f"{', '.join(sorted(static_only))}: only for mode='static'")
        if self.op_types is not None:
            known = IntegerOpsRegistry if self.mode == "dynamic" else QDQRegistry
            if not self.op_types:
                raise ValueError("op_types is empty; leave it out for the default")
            unknown = sorted(set(self.op_types) - set(known))
            if unknown:
                raise ValueError(
                    f"op_types {unknown} cannot be quantized in mode={self.mode!r}; "
                    f"choose from {sorted(known)}"
                )
            if len(set(self.op_types)) != len(self.op_types):
                raise ValueError(f"op_types has duplicates: {list(self.op_types)}")
        return self

    @property
    def quantized_op_types(self) -> tuple[str, ...]:
        if self.op_types is not None:
            return self.op_types
        return ("MatMul",) if self.mode == "dynamic" else ("MatMul", "Gemm")


# --------------------------------------------------------------------------------------------
# Pre-processing


def _fold_static_dims(model: onnx.ModelProto) -> int:
    """Replace `Gather(Shape(x), i)` by a constant where dimension i of x is static.

    Why (graphs from PyTorch's exporter; the graph writer's weights are plain initializers
    already): the exported last block slices its q/k/v weights with `w[:hidden]`, and the exporter
    records `hidden` as `Shape(x)[2]` of an activation. The weight then reaches its MatMul
    through Slice/Transpose of a run-time value, so no quantizer sees a constant weight and
    that block's attention projections would stay fp32. Once the lookup is a constant, ORT's
    constant folding (inside `quant_pre_process`) turns the chain into plain initializers.
    Only dimensions that ONNX's own (conservative) shape inference proves static are folded;
    batch and length stay dynamic.
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in (*inferred.graph.value_info, *graph.input)}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    shapes = {n.output[0]: n for n in graph.node if n.op_type == "Shape"}
    kept, folded = [], 0
    for node in graph.node:
        shape_node = shapes.get(node.input[0]) if node.op_type == "Gather" else None
        index = consts.get(node.input[1]) if shape_node is not None else None
        if shape_node is not None and index is not None and index.ndim == 0 and index >= 0:
            start = next((a.i for a in shape_node.attribute if a.name == "start"), 0)
            info = infos.get(shape_node.input[0])
            dims = info.type.tensor_type.shape.dim if info is not None else []
            pos = start + int(index)
            if start >= 0 and pos < len(dims) and dims[pos].HasField("dim_value"):
                value = np.array(dims[pos].dim_value, dtype=index.dtype)
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                folded += 1
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    prune_initializers(graph)
    return folded


def preprocess(src: str | Path, dst: str | Path) -> None:
    """Static-dimension folding, then ORT's `quant_pre_process` (shape inference + basic
    graph optimizations), as ORT recommends before quantizing.

    Symbolic shape inference is skipped: on this graph it records the sliced window as exactly
    `max_len` long, which is wrong for shorter requests; ONNX's shape inference is enough for
    the quantizers (they need weight shapes, not activation shapes).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    model = load_scoring_model(src)
    _fold_static_dims(model)
    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        save_model(model, folded)
        try:
            quant_pre_process(str(folded), str(dst), skip_symbolic_shape=True)
        except Exception as exc:
            raise QuantizeError(f"{src}: ONNX Runtime pre-processing failed ({exc})") from None


def quantizable_nodes(path: str | Path, cfg: QuantizeConfig) -> list[str]:
    """Names of the nodes `cfg` would quantize in a pre-processed graph, in graph order.

    MatMul/Gemm count only with a constant float weight as second input (dynamic quantization
    needs one; static with `matmul_const_b_only` likewise) - the candidates of the adaptive
    search.
    """
    graph = load_scoring_model(path).graph
    weights = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    const_b_only = cfg.mode == "dynamic" or cfg.matmul_const_b_only
    names = []
    for node in graph.node:
        if node.op_type not in cfg.quantized_op_types or node.name in cfg.nodes_to_exclude:
            continue
        if node.op_type in MATMUL_OPS and const_b_only and node.input[1] not in weights:
            continue
        names.append(node.name)
    return names


# --------------------------------------------------------------------------------------------
# INT8 with ORT's quantizers


class _HistoryReader:
    """Feeds the calibration batches to ORT's calibrator (its `CalibrationDataReader` API)."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = batches
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        self._next += 1
        return {INPUT_NAME: self.batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.batches)


def calibration_batches(
    histories: Sequence[np.ndarray], max_len: int, cfg: QuantizeConfig, src: Path
) -> list[np.ndarray]:
    """Up to `cfg.calibration_sequences` training histories (seeded choice), left-padded."""
    usable = [np.asarray(h, dtype=np.int64) for h in histories if len(h)]
    if not usable:
        raise QuantizeError(f"{src}: static quantization needs non-empty training histories")
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.calibration_sequences, len(usable))
    chosen = [usable[i] for i in sorted(rng.choice(len(usable), size=n, replace=False))]
    # One common shape: ORT's histogram calibrators (entropy, percentile) stack the batches
    # with np.asarray, so the batch size divides the count (the remainder is dropped) and
    # every batch is padded to the same width.
    size = min(cfg.calibration_batch_size, n)
    chosen = chosen[: n // size * size]
    width = min(max_len, max(len(h) for h in chosen))
    return [pad_left(chosen[i : i + size], max_len, width) for i in range(0, len(chosen), size)]


def _calibration_method(cfg: QuantizeConfig) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[cfg.calibration]


def calibrate(pre: Path, cfg: QuantizeConfig, batches: list[np.ndarray], cache: Path) -> None:
    """Collect activation ranges once with ORT's calibrator and store them in `cache` (ORT's
    calibration-cache JSON), which `quantize_static` then reads instead of calibrating again.

    Why not let `quantize_static` calibrate: (1) the adaptive search quantizes the same graph
    ~N times and must not re-run calibration each time; (2) `quantize_static` builds the
    entropy calibrator with 128 histogram bins and 128 quantized bins, for which the KL search
    has a single candidate - the full min/max range - so "entropy" silently equals "minmax"
    (identical scales, checked on the test model). Here entropy uses `cfg.entropy_bins`
    (TensorRT's KL calibration uses 2048) so the threshold search can clip outliers; the
    search is pure Python, ~0.2 s per tensor at 512 bins and ~1.4 s at 2048.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        create_calibrator,
        save_tensors_data,
    )

    # ORT type-checks the reader against its abstract class.
    class Reader(_HistoryReader, CalibrationDataReader):
        pass

    entropy = {"num_bins": cfg.entropy_bins, "num_quantized_bins": 128}
    extra = entropy if cfg.calibration == "entropy" else {}
    with tempfile.TemporaryDirectory(prefix="recsys-calib-") as tmp:
        calibrator = create_calibrator(
            pre,
            list(cfg.quantized_op_types),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_calibration_method(cfg),
            extra_options=extra,
        )
        # Entropy and percentile calibrators print progress to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(Reader(batches))
            ranges = calibrator.compute_data()
        del calibrator  # holds an ORT session on the augmented model inside `tmp`
    save_tensors_data(ranges, cache)


def _ort_quantize(
    pre: Path,
    out: Path,
    cfg: QuantizeConfig,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    calibration_cache: Path | None = None,
) -> None:
    """One ORT quantization of the pre-processed graph `pre` into `out`.

    `only` restricts quantization to those nodes (default: `quantizable_nodes`; ORT reads an
    empty list as "all", so one is refused); `exclude` keeps nodes in float. Static mode reads
    its ranges from `calibration_cache` (see `calibrate`).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if only is None:
        # Explicit node list: ORT's QDQ quantizer ignores its MatMulConstBOnly option, and
        # this is where `matmul_const_b_only` (and `nodes_to_exclude`) take effect.
        only = quantizable_nodes(pre, cfg)
    if not only:
        raise ValueError("`only` must name at least one node")
    common: dict[str, Any] = {
        "op_types_to_quantize": list(cfg.quantized_op_types),
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "weight_type": QuantType.QInt8,
        "nodes_to_quantize": list(only),
        "nodes_to_exclude": sorted({*cfg.nodes_to_exclude, *exclude}),
    }
    if cfg.mode == "dynamic":
        quantize_dynamic(pre, out, extra_options={"MatMulConstBOnly": True}, **common)
        _reshare_item_matrix(out)
        return
    if calibration_cache is None or not calibration_cache.is_file():
        raise ValueError("static quantization needs a calibration cache; run calibrate()")
    quantize_static(
        pre,
        out,
        None,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8 if cfg.activation_type == "uint8" else QuantType.QInt8,
        calibrate_method=_calibration_method(cfg),
        # Products stay float at their output (no Q/DQ after them): quantizing `scores`
        # would round the whole catalogue's scores to 256 levels and tie the ranking.
        extra_options={"OpTypesToExcludeOutputQuantization": list(cfg.quantized_op_types)},
        calibration_cache_path=calibration_cache,
        **common,
    )
    _reshare_item_matrix(out)


def _quantize_file(
    src: Path,
    dst: Path,
    cfg: QuantizeConfig,
    batches: list[np.ndarray] | None,
) -> ModelSummary:
    n_scores = score_width(load_scoring_model(src), src)
    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as work:
        pre = Path(work) / "pre.onnx"
        preprocess(src, pre)
        if not quantizable_nodes(pre, cfg):
            raise QuantizeError(f"{src}: no {'/'.join(cfg.quantized_op_types)} node to quantize")
        cache = Path(work) / "calibration.json"
        with atomic_output(dst, n_scores) as tmp:
            try:
                if batches is not None:
                    calibrate(pre, cfg, batches, cache)
                _ort_quantize(pre, tmp, cfg, calibration_cache=cache)
            except Exception as exc:
                raise QuantizeError(f"{src}: ONNX Runtime quantization failed ({exc})") from None
    return describe(dst)


def _reshare_item_matrix(path: Path) -> None:
    """Undo the copy ORT's quantizers make of a shared item matrix.

    They rewrite every `Gemm(transB=1)` as a `MatMul` on a transposed copy of B; for the
    output product that copy is the item matrix the input Gather already holds (the largest
    tensor of the model). A float MatMul whose weight is exactly the transpose of a Gather's
    matrix becomes `Gemm(x, matrix, transB=1)` on the Gather's own initializer again.
    """
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gathered = {
        n.input[0]: numpy_helper.to_array(inits[n.input[0]])
        for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits
        and inits[n.input[0]].data_type == TensorProto.FLOAT
    }  # fmt: skip
    changed = False
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            continue
        w = numpy_helper.to_array(weight)
        shared = next(
            (n for n, m in gathered.items() if m.shape == w.T.shape and np.array_equal(m, w.T)),
            None,
        )
        if shared is None:
            continue
        output = node.output[0]
        # ORT also split the zero bias off into an Add: fold it back in.
        consumers = [n for n in graph.node if output in n.input]
        if len(consumers) == 1 and consumers[0].op_type == "Add":
            add = consumers[0]
            other = add.input[1] if add.input[0] == output else add.input[0]
            bias = constant_value(graph, other)
            if bias is not None and not bias.any():
                output = add.output[0]
                graph.node.remove(add)
        gemm = helper.make_node("Gemm", [node.input[0], shared], [output], name=node.name, transB=1)
        graph.node.insert(list(graph.node).index(node), gemm)
        graph.node.remove(node)
        changed = True
    if changed:
        prune_initializers(graph)
        save_model(model, path)


def quantize_dynamic_int8(
    src: str | Path, dst: str | Path, cfg: QuantizeConfig | None = None
) -> ModelSummary:
    """Int8 weights, activations quantized per call (`quantize_dynamic`).

    No calibration data: each activation's range comes from the request itself, which is why
    it stayed the most accurate INT8 mode here. The item Gather is left in fp32 (use
    `quantize_item_matrix` for it).
    """
    cfg = cfg or QuantizeConfig()
    if cfg.mode != "dynamic":
        raise QuantizeError(f"{src}: quantize_dynamic_int8 needs mode='dynamic', got {cfg.mode!r}")
    return _quantize_file(Path(src), Path(dst), cfg, None)


def quantize_static_int8(
    src: str | Path,
    dst: str | Path,
    cfg: QuantizeConfig,
    calibration_histories: Sequence[np.ndarray],
    max_len: int,
) -> ModelSummary:
    """QDQ int8 with activation ranges fixed from TRAINING histories (`quantize_static`).

    Calibrating on training rather than validation sequences keeps the validation numbers
    that judge the variant honest. `max_len` is the model's window (manifest architecture).
    """
    if cfg.mode != "static":
        raise QuantizeError(f"{src}: quantize_static_int8 needs mode='static', got {cfg.mode!r}")
    batches = calibration_batches(calibration_histories, max_len, cfg, Path(src))
    return _quantize_file(Path(src), Path(dst), cfg, batches)
