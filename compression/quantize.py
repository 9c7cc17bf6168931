"""INT8 and FP16 variants of an exported SASRec graph, built with ONNX Runtime's own tools.

Every function reads an ONNX file written by `compression.export.export_onnx` (`item_ids` int64
`[batch, length]` in, `scores` float32 `[batch, n_items + 1]` out) and writes a new file with
the same signature, so the serving code never needs to know which variant it loaded.

- `quantize_dynamic_int8`: int8 weights, activations quantized at run time
  (`onnxruntime.quantization.quantize_dynamic`). `../shared/DESIGN.md` §8 measured it the
  fastest and most accurate INT8 mode on this CPU, so it is the default.
- `quantize_static_int8`: QDQ format with activation ranges calibrated on training sequences.
- `adaptive_quantize`: either of the two, with the nodes that hurt validation NDCG@10 most kept
  in float until a quality budget is met.
- `quantize_item_matrix`: the item-embedding matrix (the bulk of the file: n_items x hidden,
  stored twice by the exporter because the output MatMul uses its transpose) becomes one int8
  matrix with one fp32 scale per row. ORT's quantizers cannot do this: `quantize_dynamic` only
  quantizes the output MatMul's copy (per tensor) and leaves the Gather's copy in fp32.
- `convert_fp16`: float16 weights and compute, int64 in and float32 out unchanged.

Every writer works on a temporary name next to `dst`, loads the result in ONNX Runtime and
runs one tiny batch through it, and only then renames it to `dst`: a failed or broken
conversion never leaves a half-written or unloadable model behind.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compression.compact import constant_value
from compression.data import Split, pad_left
from compression.evaluate import Scorer, evaluate_scorer
from compression.export import INPUT_NAME, OUTPUT_NAME, top_k_agreement

ScorerEval = Callable[[Path], float]  # ONNX file -> validation NDCG@10

# Op types whose presence means a node computes in integer arithmetic.
_INT8_OPS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}
)
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
MS_DOMAIN = "com.microsoft"


class QuantizeError(ValueError):
    """A model that cannot be quantized or converted; the message names the file."""


class QuantizeConfig(BaseModel):
    """How to quantize to INT8 with ONNX Runtime. Unknown keys and impossible values are refused.

    Defaults follow what was measured on this 2-core AVX-512/VNNI CPU (DESIGN §8): dynamic
    quantization of the MatMuls with a constant weight; static QDQ only of those MatMuls too,
    because quantizing every op type (or the activation x activation attention MatMuls) was
    the slowest and least accurate recipe.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = Field(False, description="one weight scale per output column")
    reduce_range: bool = Field(
        False, description="7-bit weights; only for CPUs without VNNI (int16 overflow)"
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
# Reading, describing, writing


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


def _load(path: str | Path) -> onnx.ModelProto:
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
            f"(compression.export), found inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    return model


def _n_scores(model: onnx.ModelProto, path: Path) -> int:
    """Static width of `scores` (n_items + 1): the exporter writes it as a fixed dimension."""
    out = next(o for o in model.graph.output if o.name == OUTPUT_NAME)
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise QuantizeError(f"{path}: {OUTPUT_NAME!r} has no static [batch, n_items + 1] shape")
    return int(dims[1].dim_value)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def describe(path: str | Path) -> ModelSummary:
    """Bytes, op counts, initializer bytes by type, and which matrix products stay float."""
    path = Path(path)
    model = _load(path)
    graph = model.graph
    producers = _producers(graph)
    init_bytes: Counter[str] = Counter()
    for init in graph.initializer:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        init_bytes[TensorProto.DataType.Name(init.data_type)] += int(np.prod(init.dims)) * itemsize
    float_mm, int8_mm = [], 0
    for node in graph.node:
        if node.op_type in _INT8_OPS:
            int8_mm += 1
        elif node.op_type in _MATMUL_OPS:
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


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _smoke_check(tmp: Path, dst: Path, n_scores: int) -> None:
    """Load the written file in ORT and score two tiny histories (one padded)."""
    try:
        session = _session(tmp, threads=1)
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
def _atomic(dst: str | Path, n_scores: int) -> Iterator[Path]:
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


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def _prune_initializers(graph: onnx.GraphProto) -> None:
    """Drop initializers and Constant nodes nothing reads (ORT warns about each one)."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    dead = [init for init in graph.initializer if init.name not in used]
    for init in dead:
        graph.initializer.remove(init)
    unused = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in unused:
        graph.node.remove(node)


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
    _prune_initializers(graph)
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
    model = _load(src)
    _fold_static_dims(model)
    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as tmp:
        folded = Path(tmp) / "folded.onnx"
        _save(model, folded)
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
    graph = _load(path).graph
    weights = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    const_b_only = cfg.mode == "dynamic" or cfg.matmul_const_b_only
    names = []
    for node in graph.node:
        if node.op_type not in cfg.quantized_op_types or node.name in cfg.nodes_to_exclude:
            continue
        if node.op_type in _MATMUL_OPS and const_b_only and node.input[1] not in weights:
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
    n_scores = _n_scores(_load(src), src)
    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as work:
        pre = Path(work) / "pre.onnx"
        preprocess(src, pre)
        if not quantizable_nodes(pre, cfg):
            raise QuantizeError(f"{src}: no {'/'.join(cfg.quantized_op_types)} node to quantize")
        cache = Path(work) / "calibration.json"
        with _atomic(dst, n_scores) as tmp:
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
        _prune_initializers(graph)
        _save(model, path)


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


# --------------------------------------------------------------------------------------------
# Adaptive: keep the harmful nodes in float


@dataclass(frozen=True)
class NodeSensitivity:
    """Harm of quantizing `node` alone, measured on the proxy histories against fp32."""

    node: str
    score_rel_mse: float  # mean squared score error / variance of the fp32 scores
    top10_agreement: float


@dataclass(frozen=True)
class AdaptiveResult:
    path: Path
    mode: str
    kept_float: tuple[str, ...]  # most sensitive first; record these in the manifest
    quantized: tuple[str, ...]
    fp32_ndcg: float
    final_ndcg: float
    relative_loss: float
    max_ndcg_loss: float
    evaluations: int  # full NDCG evaluations, the fp32 one included
    proxy_runs: int  # cheap per-node quantize-and-score runs
    sensitivities: tuple[NodeSensitivity, ...]  # most harmful first
    trace: tuple[tuple[int, float], ...] = field(default=())  # (nodes kept float, NDCG@10)

    def as_manifest(self) -> dict[str, Any]:
        return {
            "quantization": self.mode,
            "kept_float_nodes": list(self.kept_float),
            "valid_ndcg@10_fp32": self.fp32_ndcg,
            "valid_ndcg@10": self.final_ndcg,
            "relative_ndcg_loss": self.relative_loss,
            "max_ndcg_loss": self.max_ndcg_loss,
        }


def relative_loss(reference: float, value: float) -> float:
    """(reference - value) / reference; negative when quantization happened to help."""
    if reference > 0:
        return (reference - value) / reference
    return 0.0 if value >= reference else float("inf")


def _scores(session: Any, batches: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in batches])


def _proxy_batches(histories: Sequence[np.ndarray], max_len: int, n: int) -> list[np.ndarray]:
    kept = [np.asarray(h, dtype=np.int64) for h in histories if len(h)][:n]
    kept.sort(key=lambda h: min(len(h), max_len))
    return [pad_left(kept[i : i + 128], max_len) for i in range(0, len(kept), 128)]


def adaptive_quantize(
    src: str | Path,
    dst: str | Path,
    cfg: QuantizeConfig,
    scorer_eval: ScorerEval,
    proxy_histories: Sequence[np.ndarray],
    max_len: int,
    calibration_histories: Sequence[np.ndarray] | None = None,
    threads: int | None = None,
) -> AdaptiveResult:
    """Quantize with `cfg.mode`, keeping the most harmful nodes in float until the relative
    validation NDCG@10 loss against the fp32 model is at most `cfg.max_ndcg_loss`.

    1. Ranking (cheap proxy, one ORT quantization per candidate): quantize ONE node alone and
       measure the score error on `cfg.proxy_sequences` of `proxy_histories` (validation
       histories) against fp32. One-node-alone was chosen over all-but-one because its error
       is attributable to that node only (no other node's noise masks the difference), the
       numbers read directly as "harm of quantizing X", and int8 rounding errors are small
       perturbations that add up roughly linearly, so the isolated harm ranks nodes the same
       way as their marginal harm. Relative score MSE ranks (it is continuous; top-10
       agreement of a single node is often exactly 1.0 and would tie).
    2. Greedy (real NDCG, `scorer_eval`): quantize all candidates; while the budget is missed,
       keep the next most harmful node in float and re-evaluate. At most N + 2 evaluations for
       N candidates (fp32, all quantized, one per kept node).

    Static mode calibrates once (`calibrate`) and reuses the ranges for every run.
    If even the model with every candidate in float misses the budget (only possible with a
    budget of 0 and float noise from the pre-processing, or a non-deterministic evaluator),
    QuantizeError is raised and nothing is written: a variant that breaks its quality
    contract must not land in `dst`.
    """
    src, dst = Path(src), Path(dst)
    n_scores = _n_scores(_load(src), src)
    batches = None
    if cfg.mode == "static":
        if calibration_histories is None:
            raise QuantizeError(f"{src}: static adaptive quantization needs calibration_histories")
        batches = calibration_batches(calibration_histories, max_len, cfg, src)
    proxy = _proxy_batches(proxy_histories, max_len, cfg.proxy_sequences)
    if not proxy:
        raise QuantizeError(f"{src}: adaptive quantization needs non-empty proxy histories")

    with tempfile.TemporaryDirectory(prefix="recsys-quant-") as work_dir:
        work = Path(work_dir)
        pre = work / "pre.onnx"
        preprocess(src, pre)
        candidates = quantizable_nodes(pre, cfg)
        if not candidates:
            raise QuantizeError(f"{src}: no {'/'.join(cfg.quantized_op_types)} node to quantize")
        cache = work / "calibration.json"

        def build(out: Path, **kw: Any) -> None:
            try:
                if batches is not None and not cache.is_file():
                    calibrate(pre, cfg, batches, cache)  # once, reused by every build
                _ort_quantize(pre, out, cfg, calibration_cache=cache, **kw)
            except Exception as exc:
                raise QuantizeError(f"{src}: ONNX Runtime quantization failed ({exc})") from None

        reference = _scores(_session(pre, threads), proxy)
        variance = float(reference[:, 1:].var()) or 1.0
        sensitivities = []
        for i, node in enumerate(candidates):
            one = work / f"one-{i}.onnx"
            build(one, only=[node])
            got = _scores(_session(one, threads), proxy)
            mse = float(np.mean((got[:, 1:] - reference[:, 1:]) ** 2)) / variance
            sensitivities.append(NodeSensitivity(node, mse, top_k_agreement(got, reference)))
            one.unlink()
        sensitivities.sort(key=lambda s: (-s.score_rel_mse, s.top10_agreement, s.node))
        order = [s.node for s in sensitivities]

        fp32 = float(scorer_eval(src))
        evaluations, trace = 1, []
        for k in range(len(order) + 1):
            candidate = work / f"keep-{k}.onnx"
            build(candidate, exclude=order[:k])
            ndcg = float(scorer_eval(candidate))
            evaluations += 1
            trace.append((k, ndcg))
            loss = relative_loss(fp32, ndcg)
            if loss <= cfg.max_ndcg_loss + 1e-12:
                break
            candidate.unlink()
        else:
            raise QuantizeError(
                f"{src}: NDCG@10 budget {cfg.max_ndcg_loss:.4f} unreachable: even with all "
                f"{len(order)} candidate nodes in float the loss is {loss:.4f} "
                f"(fp32 {fp32:.5f}, got {ndcg:.5f}); nothing written to {dst}"
            )
        with _atomic(dst, n_scores) as tmp:
            candidate.replace(tmp)
    return AdaptiveResult(
        path=dst,
        mode=cfg.mode,
        kept_float=tuple(order[:k]),
        quantized=tuple(order[k:]),
        fp32_ndcg=fp32,
        final_ndcg=ndcg,
        relative_loss=loss,
        max_ndcg_loss=cfg.max_ndcg_loss,
        evaluations=evaluations,
        proxy_runs=len(candidates),
        sensitivities=tuple(sensitivities),
        trace=tuple(trace),
    )


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    cfg: QuantizeConfig,
    *,
    max_len: int,
    calibration_histories: Sequence[np.ndarray] | None = None,
    scorer_eval: ScorerEval | None = None,
    proxy_histories: Sequence[np.ndarray] | None = None,
) -> ModelSummary | AdaptiveResult:
    """Dispatch on `cfg.mode` and `cfg.adaptive` (what a recipe's [quantize] table selects)."""
    if cfg.adaptive:
        if scorer_eval is None or proxy_histories is None:
            raise QuantizeError(
                f"{src}: adaptive quantization needs scorer_eval and proxy_histories"
            )
        return adaptive_quantize(
            src, dst, cfg, scorer_eval, proxy_histories, max_len, calibration_histories
        )
    if cfg.mode == "dynamic":
        return quantize_dynamic_int8(src, dst, cfg)
    if calibration_histories is None:
        raise QuantizeError(f"{src}: static quantization needs calibration_histories")
    return quantize_static_int8(src, dst, cfg, calibration_histories, max_len)


# --------------------------------------------------------------------------------------------
# Item matrix: int8, one scale per row


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


def quantize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row| / 127, values in [-127, 127].

    Per row because item vectors differ in norm (popular items grow larger): one scale for
    the whole matrix would spend most of the 8 bits on the few largest rows. An all-zero row
    (padding, id 0) gets scale 1 so nothing divides by zero.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    scale = np.abs(matrix).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _static_rank(model: onnx.ModelProto, name: str) -> int | None:
    inferred = onnx.shape_inference.infer_shapes(model)
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def quantize_item_matrix(
    src: str | Path, dst: str | Path, output_compute: Literal["int8", "float"] = "int8"
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

    Beauty teacher (12,102 x 64): 6.51 MB -> 1.15 MB, top-10 agreement with fp32 0.988 (int8
    output) / 0.991 (float output) on 2,000 validation histories; then dynamic: 0.96 MB.

    Untied models (separate output matrix) get two int8 matrices. Order with dynamic
    quantization: item matrix FIRST, then `quantize_dynamic_int8` (it leaves QGemm/Gemm alone
    and quantizes the block MatMuls) - one shared int8 matrix with per-row scales. The other
    order also works, but the output MatMul is then already int8 (ORT's per-tensor scale) and
    only the Gather's copy is converted here, so two int8 copies remain.
    """
    src, dst = Path(src), Path(dst)
    model = _load(src)
    graph = model.graph
    n_rows = _n_scores(model, src)
    inits = {i.name: i for i in graph.initializer}
    floats = {n: i for n, i in inits.items() if i.data_type == TensorProto.FLOAT}

    out_node = _producers(graph)[OUTPUT_NAME]
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
            "MatMul); was it already quantized, or does it use mixed-dimension item "
            "embeddings (emb_cutoffs; their small factors stay fp32: use mode=dynamic alone)?"
        )
    emb = numpy_helper.to_array(floats[gather.input[0]]) if gather is not None else None
    shared = emb is not None and out_matrix is not None and np.array_equal(emb, out_matrix)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise QuantizeError(f"{src}: opset {opset} < 13 (per-axis DequantizeLinear)")

    new_inits: list[TensorProto] = []

    def add_matrix(matrix: np.ndarray, base: str) -> tuple[str, str]:
        q, scale = quantize_rows(matrix)
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
            product = OUTPUT_NAME if out_bias is None else f"{p}_product"
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
                    helper.make_node("Add", [product, out_bias], [OUTPUT_NAME], name=f"{p}_bias")
                )
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _prune_initializers(graph)
    uses_ms = output_compute == "int8" and out_matrix is not None
    if uses_ms and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    with _atomic(dst, n_rows) as tmp:
        _save(model, tmp)
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
    )


# --------------------------------------------------------------------------------------------
# FP16


def convert_fp16(src: str | Path, dst: str | Path) -> ModelSummary:
    """Float16 weights and compute; `item_ids` stays int64 and `scores` float32.

    Uses `onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`
    (bundled with onnxruntime, no onnxconverter-common needed). Halves the weights. Meant for
    GPUs, not this CPU: ORT's CPU provider lacks fp16 kernels for most of these ops and wraps
    them in casts back to fp32 (the Beauty teacher's 11 Casts become 36 in ORT's optimized
    graph), so it gains nothing and is a little slower - measured on the Beauty teacher, 2
    threads, length 50: 0.244 vs 0.217 ms at batch 1, 24.2 vs 23.1 ms at batch 64
    (`benchmarks/quantize_check.py`, on a machine shared with a training run). Top-10
    agreement with fp32 was 0.9995. Masks in the model use `torch.where`, which is why the
    conversion succeeds at all (DESIGN §8: a float-cast mask breaks it).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = _load(src)
    n_scores = _n_scores(model, src)
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise QuantizeError(f"{src}: float16 conversion failed ({exc})") from None
    with _atomic(dst, n_scores) as tmp:
        _save(half, tmp)
    return describe(dst)


# --------------------------------------------------------------------------------------------
# Comparing and evaluating variants


@dataclass(frozen=True)
class OutputComparison:
    sequences: int
    max_abs_diff: float
    top10_agreement: float


def compare_outputs(
    fp32_path: str | Path,
    other_path: str | Path,
    histories: Sequence[np.ndarray],
    max_len: int,
    batch_size: int = 256,
    threads: int | None = None,
) -> OutputComparison:
    """Score the same histories with both files: max |diff| and mean top-10 overlap."""
    for path in (fp32_path, other_path):
        _load(path)
    if not len(histories):
        raise QuantizeError(f"{other_path}: no histories to compare on")
    a, b = _session(Path(fp32_path), threads), _session(Path(other_path), threads)
    worst, agree = 0.0, 0.0
    for start in range(0, len(histories), batch_size):
        batch = pad_left(histories[start : start + batch_size], max_len)
        x, y = _scores(a, [batch]), _scores(b, [batch])
        worst = max(worst, float(np.abs(x - y).max()))
        agree += top_k_agreement(x, y) * len(batch)
    return OutputComparison(len(histories), worst, agree / len(histories))


def onnx_scorer(path: str | Path, threads: int | None = None) -> Scorer:
    """An ORT session on `path` as a `compression.evaluate` scorer."""
    session = _session(Path(path), threads)

    def score(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    return score


def subsample_users(split: Split, users: int, stage: str = "valid", seed: int = 0) -> Split:
    """The same split restricted to `users` users that are evaluated at `stage`."""
    targets = split.valid_target if stage == "valid" else split.test_target
    eligible = np.flatnonzero(targets > 0)
    if users >= len(eligible):
        return split
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return Split(
        train=[split.train[u] for u in chosen],
        valid_target=split.valid_target[chosen],
        test_target=split.test_target[chosen],
        n_items=split.n_items,
    )


def ndcg_evaluator(
    split: Split,
    max_len: int,
    stage: str = "valid",
    users: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ScorerEval:
    """`path -> NDCG@10` with full ranking (`evaluate_scorer`), optionally on a seeded user
    subsample: the adaptive search evaluates up to N + 2 models, and a few thousand users
    rank variants as well as all of them."""
    sub = subsample_users(split, users, stage, seed) if users is not None else split

    def evaluate(path: Path) -> float:
        return evaluate_scorer(onnx_scorer(path, threads), sub, stage, max_len)["ndcg@10"]

    return evaluate
