"""TensorRT engine build: shapes, config translation (fake `tensorrt`), errors, matching.

The real build runs only where TensorRT and a GPU exist (`gpu` mark); everything else is
checked against a fake module that records what the builder was asked to do.
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

import compression.export.tensorrt as trt_mod
from compression.export.tensorrt import (
    EngineBuildError,
    EngineConfig,
    EngineInfo,
    LocalRuntime,
    TensorRTUnavailable,
    build_engine,
    engine_matches,
    engine_mismatch,
    import_tensorrt,
    precision_flags,
    profile_index,
    profile_shapes,
)


def test_profile_shapes_cover_each_bucket() -> None:
    cfg = EngineConfig(max_batch_size=64, length_buckets=(16, 32, 64, 128, 200))
    assert profile_shapes(cfg) == [
        ((1, 1), (64, 16), (64, 16)),
        ((1, 17), (64, 32), (64, 32)),
        ((1, 33), (64, 64), (64, 64)),
        ((1, 65), (64, 128), (64, 128)),
        ((1, 129), (64, 200), (64, 200)),
    ]
    small = EngineConfig(max_batch_size=8, opt_batch_size=2, length_buckets=(50,))
    assert profile_shapes(small) == [((1, 1), (2, 50), (8, 50))]
    assert [profile_index(cfg, n) for n in (1, 16, 17, 200)] == [0, 0, 1, 4]
    with pytest.raises(ValueError, match="largest bucket"):
        profile_index(cfg, 201)


def test_engine_config_validation() -> None:
    for bad in (
        {"length_buckets": (32, 16)},
        {"length_buckets": (16, 16)},
        {"length_buckets": (0, 16)},
        {"length_buckets": ()},
        {"opt_batch_size": 128},
        {"precision": "fp8"},
        {"workspace_bytes": 10},
        {"max_batch": 4},
    ):
        with pytest.raises(ValidationError):
            EngineConfig(**bad)
    assert precision_flags(EngineConfig()) == ["FP16"]
    assert precision_flags(EngineConfig(precision="int8")) == ["INT8", "FP16"]
    assert precision_flags(EngineConfig(precision="int8", strongly_typed=True)) == []


# ---------------------------------------------------------------- a fake TensorRT 10


def fake_tensorrt(
    *, parse_ok: bool = True, build_ok: bool = True, qdq: bool = False, version: str = "10.3.0"
) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"flags": [], "profiles": [], "pool": None, "network_flags": None}
    trt.calls = calls

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]
    trt.ILogger = ILogger
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 INT8 BF16")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NDCF", {"STRONGLY_TYPED": 1})
    trt.LayerType = enum.Enum("LayerType", "GATHER MATRIX_MULTIPLY QUANTIZE DEQUANTIZE")

    class Tensor:
        name = "item_ids"

    class Layer:
        def __init__(self, kind: object) -> None:
            self.type = kind

    layers = [trt.LayerType.GATHER, trt.LayerType.MATRIX_MULTIPLY]
    if qdq:
        layers += [trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE]

    class Network:
        num_inputs = 1
        num_layers = len(layers)

        def get_input(self, i: int) -> Tensor:
            return Tensor()

        def get_layer(self, i: int) -> Layer:
            return Layer(layers[i])

    class ParserError:
        def desc(self) -> str:
            return "Unsupported operator: TopK8"

        def node(self) -> int:
            return 7

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.num_errors = 0 if parse_ok else 1
            self.logger = logger

        def parse_from_file(self, path: str) -> bool:
            calls["parsed"] = path
            return parse_ok

        def get_error(self, i: int) -> ParserError:
            return ParserError()

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            calls["profiles"].append((name, low, opt, high))

    class Config:
        def set_memory_pool_limit(self, pool: object, size: int) -> None:
            calls["pool"] = (pool, size)

        def set_flag(self, flag: object) -> None:
            calls["flags"].append(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            return len(calls["profiles"]) - 1

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            self.logger.log(Severity.INFO, "not kept")
            if not build_ok:
                self.logger.log(Severity.ERROR, "out of workspace memory")
                return None
            self.logger.log(Severity.WARNING, "weights outside FP16 range")
            return b"PLAN-BYTES"

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not parsed by the fake")
    return path


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_mod, "gpu_compute_capability", lambda device=0: ("9.0", "Fake GPU"))


def install(monkeypatch: pytest.MonkeyPatch, **kw: object) -> types.ModuleType:
    fake = fake_tensorrt(**kw)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_fp16_build_sets_flags_profiles_workspace(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, on_gpu: None
) -> None:
    trt = install(monkeypatch)
    cfg = EngineConfig(max_batch_size=32, length_buckets=(16, 50), workspace_bytes=1 << 28)
    messages: list[str] = []
    plan = onnx_file.with_name("model.plan")
    info = build_engine(onnx_file, plan, cfg, log=messages.append)
    calls = trt.calls
    assert calls["parsed"] == str(onnx_file)
    assert calls["network_flags"] == 0
    assert calls["flags"] == [trt.BuilderFlag.FP16]
    assert calls["pool"] == (trt.MemoryPoolType.WORKSPACE, 1 << 28)
    assert calls["profiles"] == [
        ("item_ids", (1, 1), (32, 16), (32, 16)),
        ("item_ids", (1, 17), (32, 50), (32, 50)),
    ]
    assert plan.read_bytes() == b"PLAN-BYTES" and not list(plan.parent.glob("*.tmp"))
    assert (info.tensorrt_version, info.compute_capability, info.precision) == (
        "10.3.0",
        "9.0",
        "fp16",
    )
    assert info.plan_bytes == 10 and info.profiles == profile_shapes(cfg)
    assert info.warnings == ["weights outside FP16 range"]  # INFO is not kept
    assert messages == ["TensorRT: weights outside FP16 range"]
    fields = info.manifest_fields()
    assert fields["profiles"][0] == [[1, 1], [32, 16], [32, 16]]
    assert engine_matches(fields, LocalRuntime("10.3.0", "9.0"))


def test_int8_is_explicit_quantization(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, on_gpu: None
) -> None:
    trt = install(monkeypatch, qdq=True)
    build_engine(onnx_file, onnx_file.with_name("m.plan"), EngineConfig(precision="int8"))
    assert trt.calls["flags"] == [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16]
    trt = install(monkeypatch, qdq=True)
    cfg = EngineConfig(precision="int8", strongly_typed=True)
    build_engine(onnx_file, onnx_file.with_name("m.plan"), cfg)
    assert trt.calls["flags"] == [] and trt.calls["network_flags"] == 1 << 1
    install(monkeypatch, qdq=False)
    with pytest.raises(EngineBuildError, match="needs a QDQ model"):
        build_engine(onnx_file, onnx_file.with_name("m.plan"), EngineConfig(precision="int8"))


def test_parser_and_builder_errors_are_reported(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, on_gpu: None
) -> None:
    plan = onnx_file.with_name("model.plan")
    plan.write_bytes(b"OLD")
    install(monkeypatch, parse_ok=False)
    with pytest.raises(EngineBuildError, match=r"Unsupported operator: TopK8 \(node 7\)"):
        build_engine(onnx_file, plan, EngineConfig())
    install(monkeypatch, build_ok=False)
    with pytest.raises(EngineBuildError, match="out of workspace memory"):
        build_engine(onnx_file, plan, EngineConfig())
    assert plan.read_bytes() == b"OLD" and not list(plan.parent.glob("*.tmp"))
    with pytest.raises(EngineBuildError, match="no input 'ids'"):
        build_engine(onnx_file, plan, EngineConfig(input_name="ids"))
    with pytest.raises(FileNotFoundError):
        build_engine(onnx_file.with_name("missing.onnx"), plan, EngineConfig())


def test_a_failed_rename_keeps_the_old_plan(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, on_gpu: None
) -> None:
    install(monkeypatch)
    plan = onnx_file.with_name("model.plan")
    plan.write_bytes(b"OLD")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trt_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        build_engine(onnx_file, plan, EngineConfig())
    assert plan.read_bytes() == b"OLD" and not list(plan.parent.glob("*.tmp"))


def test_tensorrt_11_without_precision_flags(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, on_gpu: None
) -> None:
    trt = install(monkeypatch, version="11.0.0")
    trt.BuilderFlag = enum.Enum("BuilderFlag", "REFIT")
    with pytest.raises(EngineBuildError, match="strongly_typed=True"):
        build_engine(onnx_file, onnx_file.with_name("m.plan"), EngineConfig())
    cfg = EngineConfig(strongly_typed=True)
    assert build_engine(onnx_file, onnx_file.with_name("m.plan"), cfg).tensorrt_version == "11.0.0"


def test_missing_tensorrt_or_gpu_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on this machine
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt --extra-index-url"):
        build_engine(onnx_file, onnx_file.with_name("m.plan"), EngineConfig())
    assert issubclass(TensorRTUnavailable, RuntimeError)
    install(monkeypatch, version="8.6.1")
    with pytest.raises(TensorRTUnavailable, match="10 or later"):
        import_tensorrt()
    install(monkeypatch)

    def no_gpu(device: int = 0) -> tuple[str, str]:
        raise TensorRTUnavailable("no NVIDIA GPU visible to PyTorch")

    monkeypatch.setattr(trt_mod, "gpu_compute_capability", no_gpu)
    with pytest.raises(TensorRTUnavailable, match="no NVIDIA GPU"):
        build_engine(onnx_file, onnx_file.with_name("m.plan"), EngineConfig())


def test_real_gpu_detection_without_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TensorRTUnavailable, match="NVIDIA GPU"):
        trt_mod.gpu_compute_capability()


def test_engine_matches() -> None:
    info = EngineInfo("10.3.0", "8.9", "fp16", False, [], 1 << 30, 10, 1.0)
    here = LocalRuntime("10.3.0", "8.9")
    assert engine_matches(info, here) and engine_matches(info.manifest_fields(), here)
    assert "TensorRT 10.3.0" in str(engine_mismatch(info, LocalRuntime("10.4.0", "8.9")))
    assert "compute capability 8.9" in str(engine_mismatch(info, LocalRuntime("10.3.0", "9.0")))
    assert not engine_matches(info, LocalRuntime(None, "8.9"))
    assert not engine_matches(info, LocalRuntime("10.3.0", None))
    assert not engine_matches({"precision": "fp16"}, here)
    # on this machine (no TensorRT, no GPU) no engine can run
    if trt_mod.local_runtime().tensorrt_version is None:
        assert not engine_matches(info)


# ---------------------------------------------------------------- the real thing


@pytest.mark.gpu
def test_real_engine_build_and_run(tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt")
    import numpy as np
    import torch

    from compression.configs import ModelConfig
    from compression.data.sequences import pad_left
    from compression.evaluate.metrics import top_k_agreement
    from compression.export.exporter import export_onnx
    from compression.model.sasrec import SASRec

    torch.manual_seed(0)
    model = SASRec(ModelConfig(n_items=200, max_len=20, hidden=32, n_heads=2)).eval()
    onnx_path, plan = tmp_path / "model.onnx", tmp_path / "model.plan"
    export_onnx(model, onnx_path)
    cfg = EngineConfig(max_batch_size=8, length_buckets=(8, 20), workspace_bytes=1 << 28)
    info = build_engine(onnx_path, plan, cfg)
    assert engine_matches(info) and plan.stat().st_size == info.plan_bytes
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.current_stream()
    rng = np.random.default_rng(0)
    hist = [rng.integers(1, 201, size=rng.integers(1, 30)) for _ in range(8)]
    for bucket in cfg.length_buckets:
        batch = torch.from_numpy(pad_left(hist, model.cfg.max_len, length=bucket))
        x = batch.cuda()
        out = torch.empty((len(hist), 201), dtype=torch.float32, device="cuda")
        context.set_optimization_profile_async(profile_index(cfg, bucket), stream.cuda_stream)
        context.set_input_shape("item_ids", tuple(x.shape))
        context.set_tensor_address("item_ids", x.data_ptr())
        context.set_tensor_address("scores", out.data_ptr())
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        with torch.inference_mode():
            want = model(batch).numpy()
        got = out.cpu().numpy()
        assert np.abs(got - want).max() < 5e-2  # FP16 kernels
        assert top_k_agreement(got, want) >= 0.9
