"""The one way this project opens an ONNX Runtime session, offline and online alike.

Latency measured offline (`recsys compare`, benchmarks) is only comparable with the
service's when the sessions are configured the same: `threads` intra-op threads, one
inter-op thread, every graph optimization, and no spinning (spinning threads burn the core
the event loop needs between batches, and the idle threads of one variant would steal the
cores of the next one timed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CPU = ["CPUExecutionProvider"]
# Written into a graph's metadata by `compression.quantize.int4`: its weights are stored as
# DequantizeLinear of constants, to be folded to float once when the session loads. ONNX
# Runtime keeps such nodes for its QDQ fusions unless told otherwise, and then unpacks every
# weight on every call (an ML-1M student: 0.35 ms instead of 0.11 ms at batch 1).
FOLD_WEIGHTS_KEY = "recsys.fold_quantized_weights"


def ort_session(
    model: str | Path | bytes,
    threads: int | None = 1,
    providers: list[str] | None = None,
    optimized_model_path: str | Path | None = None,
) -> Any:
    """An `onnxruntime.InferenceSession` for a file or serialized model. `threads=None` leaves
    ONNX Runtime's default (all cores); `optimized_model_path` also writes the graph ONNX
    Runtime runs after its optimizations (for node counts)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=providers or CPU)
    if folds_weights(session):  # only int4 files, small: loading them twice costs little
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(source, options, providers=providers or CPU)
    return session


def folds_weights(session: Any) -> bool:
    """Does the session's model ask for its quantized weights to be folded at load?"""
    return session.get_modelmeta().custom_metadata_map.get(FOLD_WEIGHTS_KEY) == "1"
