"""Inference engines behind one protocol: int64 item ids `[batch, length]` -> float32 scores
(or, for a two-stage variant, user vectors: `app.scorers` ranks either).

- `OrtEngine`: ONNX Runtime; CPU, or CUDA / TensorRT execution providers when installed.
  onnxruntime-gpu silently falls back to CPU when CUDA cannot start, so the providers the
  session really got are read back and reported.
- `TensorRTEngine`: a native TensorRT plan, only where its TensorRT version and GPU compute
  capability match the ones it was built with (an engine runs only where it was built).
- `TorchEngine`: the PyTorch module rebuilt from the manifest's architecture by a factory
  the composition root injects (`app` never imports `compression`), with its weights read
  from `model.safetensors` (tensors and a JSON header: nothing is ever unpickled), on a CUDA
  GPU without TensorRT (CPU when forced there and no GPU exists). Optional: PyTorch is
  imported only here, never by the CPU service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model_store.checkpoint import stored_names
from model_store.runtime import CPU, ort_session
from model_store.store import CHECKPOINT_FILE, LEGACY_CHECKPOINTS

log = logging.getLogger(__name__)

INPUT_NAME = "item_ids"
OUTPUT_NAME = "scores"
USER_VECTOR_NAME = "user_vector"  # the output of a two-stage variant's model

# Builds the torch engine's module (a `torch.nn.Module`, weights not loaded) from a manifest's
# architecture; `recsys serve` passes one that imports `compression` only when called.
TorchModuleFactory = Callable[[dict[str, Any]], Any]


class EngineError(RuntimeError):
    """An engine that cannot be built from the given artifact on this machine."""


class Engine(Protocol):
    name: str  # "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cuda", ...

    def run(self, item_ids: np.ndarray) -> np.ndarray:
        """Scores `[batch, n_items + 1]` (user vectors `[batch, dim]` for a two-stage variant)
        for left-padded int64 ids `[batch, length]`."""
        ...


class OrtEngine:
    def __init__(
        self,
        path: Path,
        threads: int = 1,
        providers: list[str] | None = None,
        output: str = OUTPUT_NAME,
    ) -> None:
        wanted = providers or CPU
        try:
            self.session = ort_session(path, threads, wanted)
        except Exception as exc:  # ORT raises several unrelated types for a bad file
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        got = self.session.get_providers()
        if got[0] != wanted[0]:
            log.warning("%s: asked for %s, ONNX Runtime runs on %s", path, wanted[0], got[0])
        self.providers = got
        self.name = {
            "TensorrtExecutionProvider": "onnxruntime-tensorrt",
            "CUDAExecutionProvider": "onnxruntime-cuda",
        }.get(got[0], "onnxruntime-cpu")
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or output not in outputs:
            raise EngineError(
                f"{path}: expected input {INPUT_NAME!r} and output {output!r}, "
                f"found inputs {inputs} and outputs {outputs}; re-export the model"
            )
        self.output = output

    def run(self, item_ids: np.ndarray) -> np.ndarray:
        return self.session.run([self.output], {INPUT_NAME: item_ids})[0]


def gpu_ort_providers() -> list[str]:
    """Best providers this onnxruntime build offers, best first (CPU always last)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in available]


def local_gpu() -> tuple[str, str] | None:
    """(TensorRT version, compute capability "major.minor") here, or None without both."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return str(trt.__version__), f"{major}.{minor}"


class TensorRTEngine:
    """A deserialized TensorRT plan run through PyTorch CUDA tensors (no extra CUDA binding)."""

    name = "tensorrt"

    def __init__(self, path: Path) -> None:
        try:
            import tensorrt as trt  # type: ignore[import-not-found]
            import torch
        except ImportError as exc:
            raise EngineError(f"{path}: TensorRT engines need tensorrt and torch ({exc})") from exc
        self._torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def run(self, item_ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(item_ids).cuda(non_blocking=True)
        self.context.set_input_shape(INPUT_NAME, tuple(ids.shape))
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        scores = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(INPUT_NAME, ids.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, scores.data_ptr())
        with torch.cuda.stream(self.stream):
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return scores.cpu().numpy()


class TorchEngine:
    """A PyTorch module for GPUs without TensorRT (and CPU checks in tests): built by
    `factory` from the manifest's architecture, weights from a safetensors file."""

    def __init__(
        self,
        path: Path,
        architecture: dict[str, Any],
        factory: TorchModuleFactory,
        length: int,
        device: str | None = None,
    ) -> None:
        try:
            import torch
            from safetensors.torch import load_file
        except ImportError as exc:
            raise EngineError(
                f"{path}: the torch engine needs torch and safetensors ({exc})"
            ) from exc
        self._torch = torch
        self.length = length  # the model's window; shorter inputs are left-padded
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            module = factory(dict(architecture))
        except Exception as exc:  # an ImportError, or an architecture the factory refuses
            raise EngineError(f"{path}: cannot build the module from the manifest ({exc})") from exc
        try:
            stored = load_file(str(path), device="cpu")  # raw tensors and a JSON header only
            # A tensor listed under several names is stored once (model_store.checkpoint).
            state = {
                name: stored[owner]
                for name, owner in stored_names(module.state_dict()).items()
                if owner in stored
            }
            state.update(stored)  # names the module lacks: refused by load_state_dict
            module.load_state_dict(state, strict=True)
        except Exception as exc:  # not safetensors, or tensors that do not fit the module
            raise EngineError(f"{path}: not usable weights for this architecture ({exc})") from exc
        self.device = torch.device(device)
        self.module: Any = module.eval().to(self.device)
        self.name = f"torch-{self.device.type}"

    def run(self, item_ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        if item_ids.shape[1] < self.length:
            item_ids = np.pad(item_ids, ((0, 0), (self.length - item_ids.shape[1], 0)))
        with torch.inference_mode():
            ids = torch.from_numpy(item_ids).to(self.device, non_blocking=True)
            return self.module(ids).float().cpu().numpy()


def build_engine(
    folder: Path,
    artifacts: dict[str, dict[str, Any]],
    kind: str,
    threads: int,
    max_len: int,
    *,
    architecture: dict[str, Any] | None = None,
    torch_factory: TorchModuleFactory | None = None,
    output: str = OUTPUT_NAME,
) -> Engine:
    """The best engine for this machine from a stored version's artifacts.

    `kind` is the setting: "auto" prefers a matching TensorRT plan, then ONNX Runtime with
    the best provider, then the PyTorch checkpoint on CUDA; the others force one engine. The
    torch engine needs `architecture` (the manifest's) and `torch_factory`. `output` other than
    "scores" (a two-stage variant's user vector) exists only as an ONNX model.
    """
    onnx = folder / "model.onnx" if "model.onnx" in artifacts else None
    if output != OUTPUT_NAME:
        if kind not in ("auto", "onnxruntime"):
            raise EngineError(
                f"{folder}: a two-stage variant (output {output!r}) runs on ONNX Runtime only; "
                f"set the engine to 'auto' or 'onnxruntime', not {kind!r}"
            )
        if onnx is None:
            raise EngineError(f"{folder}: has no ONNX model (model.onnx) to serve")
        return OrtEngine(onnx, threads=threads, providers=gpu_ort_providers(), output=output)
    plan = folder / "model.plan" if "model.plan" in artifacts else None
    checkpoint = folder / CHECKPOINT_FILE if CHECKPOINT_FILE in artifacts else None
    legacy = [name for name in LEGACY_CHECKPOINTS if name in artifacts]
    if kind in ("auto", "tensorrt") and plan is not None:
        here, info = local_gpu(), artifacts["model.plan"]
        built = (info.get("tensorrt_version"), info.get("compute_capability"))
        if here is not None and built == here:
            return TensorRTEngine(plan)
        why = "no TensorRT/GPU here" if here is None else f"built for {built}, here {here}"
        if kind == "tensorrt" or onnx is None:
            raise EngineError(f"{plan}: cannot run this TensorRT engine ({why})")
        log.warning("%s: not using the TensorRT engine (%s); falling back to ONNX", plan, why)
    elif kind == "tensorrt":
        raise EngineError(f"{folder}: has no TensorRT engine (model.plan)")
    if kind == "torch" or (kind == "auto" and onnx is None and (checkpoint or legacy)):
        if checkpoint is None and legacy:
            raise EngineError(
                f"{folder}: holds only {legacy[0]}, a pickle-based format this version never "
                f"loads (pickle can run code); re-publish it with {CHECKPOINT_FILE}"
            )
        if checkpoint is None:
            raise EngineError(f"{folder}: has no PyTorch checkpoint ({CHECKPOINT_FILE})")
        if torch_factory is None or architecture is None:
            raise EngineError(
                f"{folder}: the torch engine needs a module factory and the manifest's "
                "architecture (`recsys serve` passes one; create_app(settings, torch_factory=...))"
            )
        return TorchEngine(checkpoint, architecture, torch_factory, max_len)
    if onnx is None:
        raise EngineError(f"{folder}: has no ONNX model (model.onnx) to serve")
    return OrtEngine(onnx, threads=threads, providers=gpu_ort_providers())
