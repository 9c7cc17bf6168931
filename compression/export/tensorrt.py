"""TensorRT engine build from an exported ONNX model (TensorRT 10 Python API, imported lazily).

One optimization profile per serving length bucket: the batcher pads every history to a
bucket, so each profile covers lengths (previous bucket, bucket] and batch sizes
1..max_batch_size, tuned for `opt_batch_size` at the bucket's length.

Precision:
- `fp16`: the FP32 ONNX graph with `BuilderFlag.FP16`; TensorRT picks FP16 kernels where
  they are faster and keeps network inputs and outputs as in the graph (int64 ids in, float32
  scores out).
- `int8`: explicit quantization. The ONNX model must already carry QuantizeLinear /
  DequantizeLinear nodes (a static QDQ model); no calibrator is used (implicit quantization
  is deprecated since TensorRT 10.1). `BuilderFlag.INT8` enables the quantized kernels and
  `BuilderFlag.FP16` lets the layers outside Q/DQ pairs run in FP16.
- `strongly_typed=True` builds a strongly typed network instead: no precision flags at all,
  every tensor keeps the type the ONNX graph gives it (TensorRT's recommendation for Q/DQ
  models, and the only mode in TensorRT 11, which removed the FP16/INT8 flags). FP16 then
  needs an FP16 ONNX model.

A plan runs only with the TensorRT version that built it, on GPUs of the same compute
capability (`engine_matches`); elsewhere the service falls back to ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field, model_validator

from compression.configs import _Strict

INPUT_NAME = (
    "item_ids"  # compression.export.exporter.INPUT_NAME, repeated to keep this import light
)
INSTALL_HINT = (
    "install TensorRT from NVIDIA's index: pip install tensorrt "
    "--extra-index-url https://pypi.nvidia.com; needs an NVIDIA GPU"
)

Shape = tuple[int, int]  # (batch, length)


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot be imported here, or there is no NVIDIA GPU to build for."""


class EngineBuildError(RuntimeError):
    """The ONNX parser or the builder refused the model; the message carries their errors."""


class EngineConfig(_Strict):
    """Shapes and precision of one engine; the shapes are those the service sends."""

    precision: Literal["fp16", "int8"] = "fp16"
    max_batch_size: int = Field(64, ge=1, description="largest batch the batcher forms")
    opt_batch_size: int | None = Field(
        None, ge=1, description="batch size kernels are tuned for; None = max_batch_size"
    )
    length_buckets: tuple[int, ...] = Field(
        (16, 32, 64, 128, 200), min_length=1, description="padded lengths, ascending"
    )
    workspace_bytes: int = Field(1 << 30, ge=1 << 20, description="builder scratch memory")
    strongly_typed: bool = Field(False, description="no precision flags; types from the graph")
    input_name: str = INPUT_NAME

    @model_validator(mode="after")
    def _shapes(self) -> EngineConfig:
        b = self.length_buckets
        if b[0] < 1 or any(x >= y for x, y in itertools.pairwise(b)):
            raise ValueError(f"length_buckets={list(b)} must be positive and strictly ascending")
        if self.opt_batch_size is not None and self.opt_batch_size > self.max_batch_size:
            raise ValueError(
                f"opt_batch_size={self.opt_batch_size} exceeds max_batch_size={self.max_batch_size}"
            )
        return self


def profile_shapes(cfg: EngineConfig) -> list[tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shapes of `item_ids` for each length bucket, in bucket order."""
    opt_batch = cfg.opt_batch_size or cfg.max_batch_size
    out, low = [], 1
    for length in cfg.length_buckets:
        out.append(((1, low), (opt_batch, length), (cfg.max_batch_size, length)))
        low = length + 1
    return out


def profile_index(cfg: EngineConfig, length: int) -> int:
    """The profile a padded batch of `length` runs under: the smallest bucket >= length."""
    for i, bucket in enumerate(cfg.length_buckets):
        if length <= bucket:
            return i
    raise ValueError(f"length {length} exceeds the largest bucket {cfg.length_buckets[-1]}")


@dataclass(frozen=True)
class EngineInfo:
    """What a stored engine needs to be trusted elsewhere: goes into the manifest."""

    tensorrt_version: str
    compute_capability: str  # "major.minor" of the GPU it was built on
    precision: str
    strongly_typed: bool
    profiles: list[tuple[Shape, Shape, Shape]]
    workspace_bytes: int
    plan_bytes: int
    build_s: float
    gpu_name: str = ""
    warnings: list[str] = field(default_factory=list)

    def manifest_fields(self) -> dict[str, Any]:
        out = asdict(self)
        out["profiles"] = [[list(s) for s in p] for p in self.profiles]
        return out


# ---------------------------------------------------------------- environment


def import_tensorrt() -> ModuleType:
    """`import tensorrt` (version 10 or later), or TensorRTUnavailable with the fix."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the package without its libnvinfer
        raise TensorRTUnavailable(f"cannot import tensorrt ({exc}); {INSTALL_HINT}") from exc
    version = str(getattr(trt, "__version__", "0"))
    if _major(version) < 10:
        raise TensorRTUnavailable(f"TensorRT {version} found, 10 or later needed; {INSTALL_HINT}")
    return trt


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def gpu_compute_capability(device: int = 0) -> tuple[str, str]:
    """("major.minor", GPU name) of a CUDA device, via PyTorch or else cuda-python."""
    try:
        import torch
    except ImportError:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        if not torch.cuda.is_available():
            raise TensorRTUnavailable(f"no NVIDIA GPU visible to PyTorch; {INSTALL_HINT}")
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}", torch.cuda.get_device_name(device)
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"neither PyTorch nor cuda-python is installed to find the GPU; {INSTALL_HINT}"
        ) from exc
    err, prop = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        raise TensorRTUnavailable(f"no usable NVIDIA GPU (CUDA error {err}); {INSTALL_HINT}")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return f"{prop.major}.{prop.minor}", name


@dataclass(frozen=True)
class LocalRuntime:
    tensorrt_version: str | None
    compute_capability: str | None


def local_runtime() -> LocalRuntime:
    """TensorRT version and GPU compute capability here (None where absent)."""
    try:
        version: str | None = str(import_tensorrt().__version__)
    except TensorRTUnavailable:
        version = None
    try:
        cc: str | None = gpu_compute_capability()[0]
    except TensorRTUnavailable:
        cc = None
    return LocalRuntime(version, cc)


def engine_mismatch(
    stored: EngineInfo | Mapping[str, Any], local: LocalRuntime | None = None
) -> str | None:
    """Why a stored engine cannot run here, or None when it can.

    A plan is tied to the exact TensorRT version that built it and to the GPU's compute
    capability (engines built with version or hardware compatibility are not produced here).
    """
    fields = stored.manifest_fields() if isinstance(stored, EngineInfo) else stored
    want_v, want_cc = fields.get("tensorrt_version"), fields.get("compute_capability")
    if not want_v or not want_cc:
        return "the engine record lacks tensorrt_version or compute_capability"
    here = local or local_runtime()
    if here.tensorrt_version is None:
        return "TensorRT is not installed here"
    if here.compute_capability is None:
        return "no NVIDIA GPU here"
    if str(want_v) != here.tensorrt_version:
        return f"built with TensorRT {want_v}, this machine has {here.tensorrt_version}"
    if str(want_cc) != here.compute_capability:
        return f"built for compute capability {want_cc}, this GPU is {here.compute_capability}"
    return None


def engine_matches(
    stored: EngineInfo | Mapping[str, Any], local: LocalRuntime | None = None
) -> bool:
    """Whether a stored engine (its TensorRT version and compute capability) can run here."""
    return engine_mismatch(stored, local) is None


# ---------------------------------------------------------------- build


def _parser_error(err: Any) -> str:
    try:
        text = str(err.desc())
        node = err.node()
        return f"{text} (node {node})" if node is not None and node >= 0 else text
    except AttributeError:
        return str(err)


def _make_logger(trt: ModuleType, log: Callable[[str], None] | None) -> Any:
    """An ILogger that keeps warnings and errors (for error messages) and forwards them."""
    warning = int(trt.ILogger.Severity.WARNING)

    class Recorder(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= warning:
                self.messages.append(str(msg))
                if log is not None:
                    log(f"TensorRT: {msg}")

    return Recorder()


def precision_flags(cfg: EngineConfig) -> list[str]:
    """`BuilderFlag` names set for `cfg` (none for a strongly typed network)."""
    if cfg.strongly_typed:
        return []
    return ["FP16"] if cfg.precision == "fp16" else ["INT8", "FP16"]


def _has_qdq(trt: ModuleType, network: Any) -> bool:
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)  # pybind enums: compare by ==
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    cfg: EngineConfig,
    log: Callable[[str], None] | None = None,
) -> EngineInfo:
    """Parse `onnx_path`, build a serialized engine for `cfg`, write it atomically to
    `plan_path` (a temporary name, then a rename; an existing plan stays on failure)."""
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    trt = import_tensorrt()
    cc, gpu_name = gpu_compute_capability()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX model not found")
    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    flags = 0
    if cfg.strongly_typed:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"{onnx_path}: TensorRT's ONNX parser failed: "
            + ("; ".join(errors) or "; ".join(logger.messages) or "no message")
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if cfg.input_name not in inputs:
        raise EngineBuildError(f"{onnx_path}: no input {cfg.input_name!r}; inputs: {inputs}")
    if cfg.precision == "int8" and not _has_qdq(trt, network):
        raise EngineBuildError(
            f"{onnx_path}: precision int8 needs a QDQ model (QuantizeLinear/DequantizeLinear "
            "nodes, e.g. ONNX Runtime static quantization in QDQ format); this graph has none"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    for name in precision_flags(cfg):
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise EngineBuildError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{name} (removed in TensorRT "
                "11): set strongly_typed=True and give a model in the wanted precision"
            )
        config.set_flag(flag)
    shapes = profile_shapes(cfg)
    for low, opt, high in shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(cfg.input_name, low, opt, high)
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - started
    if serialized is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT could not build the engine: "
            + ("; ".join(logger.messages[-5:]) or "no message")
        )
    data = memoryview(serialized)
    _write_atomically(plan_path, data)
    return EngineInfo(
        tensorrt_version=str(trt.__version__),
        compute_capability=cc,
        precision=cfg.precision,
        strongly_typed=cfg.strongly_typed,
        profiles=shapes,
        workspace_bytes=cfg.workspace_bytes,
        plan_bytes=data.nbytes,
        build_s=build_s,
        gpu_name=gpu_name,
        warnings=list(logger.messages),
    )


def _write_atomically(path: Path, data: memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
