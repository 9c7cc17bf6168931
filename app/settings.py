"""Serving settings: one validated class, read from `RECSYS_*` environment variables."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

VARIANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_MODEL_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(@(\d+|latest))?$")


class BatchSettings(BaseModel):
    """Dynamic batcher knobs (one batcher per variant); env `RECSYS_BATCH__MAX_WAIT_S` etc."""

    model_config = ConfigDict(extra="forbid")

    # 32, not 64: at 64 connections a 64-batch puts every client in one batch, and the
    # event loop and the inference thread then take turns instead of overlapping (measured).
    max_batch_size: int = Field(32, ge=1, le=4096)
    # Batches form while the engine is busy (app/batching.py): a free slot takes whatever is
    # queued at once. >0 also holds a batch open that long from its first request; 0, the
    # default, never delays a lone request (at concurrency 1 the old 2 ms wait was most of
    # the latency: docs/serving.md).
    max_wait_s: float = Field(0.0, ge=0.0, le=1.0)
    # Admission: live requests beyond what the engine drains in max_queue_delay_s (at its
    # measured speed) are refused at once (429), so accepted work finishes inside its
    # deadline under overload instead of timing out; max_queue_size caps it.
    max_queue_delay_s: float = Field(0.25, gt=0.0, le=60.0)
    max_queue_size: int = Field(1024, ge=1)
    # A lone request on an idle engine is computed on the event loop, not handed to a worker
    # thread and back (two thread wake-ups); off for engines slower than ~1 ms per request,
    # where the loop would stop parsing for that long.
    inline_when_idle: bool = True
    # Batches computing at once per variant: >1 overlaps padding/top-k with inference.
    max_inflight_batches: int = Field(2, ge=1, le=64)
    length_buckets: list[int] = Field(default_factory=lambda: [16, 32, 64, 128, 200])

    @field_validator("length_buckets")
    @classmethod
    def _sorted_positive(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("length_buckets must be a non-empty list of positive lengths")
        return sorted(set(value))


class Settings(BaseSettings):
    """Everything the service needs; e.g. `RECSYS_VARIANTS='{"teacher":"ml1m-teacher@1"}'`."""

    model_config = SettingsConfigDict(
        env_prefix="RECSYS_", env_nested_delimiter="__", extra="forbid"
    )

    store: str = Field("model_store/models", description="model store root folder")
    # variant name -> stored model reference (NAME, NAME@VERSION or NAME@latest)
    variants: dict[str, str] = Field(default_factory=dict)
    # Traffic share per variant; missing variants get 0 (reachable only by override).
    weights: dict[str, float] = Field(default_factory=dict)
    experiment_salt: str = Field("exp-1", min_length=1, max_length=128)
    shadow_variant: str | None = None
    shadow_fraction: float = Field(0.0, ge=0.0, le=1.0)
    reference_variant: str | None = Field(
        None, description="the full model that /v1/compare measures retention against"
    )
    admin_token: SecretStr | None = Field(
        None,
        min_length=16,  # an empty or short token must never switch the admin API on
        description="bearer token for /admin/*; unset = admin endpoints disabled",
    )
    engine: Literal["auto", "onnxruntime", "tensorrt", "torch"] = "auto"
    intra_op_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime threads/session")
    # 19, not a milder value: under overload the loop must still parse, refuse and answer
    # health checks at once. Measured (64 hey processes at 4x capacity, service on its own
    # core): refusals p99 5.7 ms at 19, 7.6 at 10, 11.2 at 5; and no throughput cost at 64
    # connections (benchmarks/results/serving-nice-check.md: student 4,739 vs 4,623 req/s).
    inference_nice: int = Field(
        19, ge=0, le=19, description="nice of inference threads (0 = same as the event loop)"
    )
    # Python's cyclic GC scans every live object in its oldest generation; a loaded service
    # holds hundreds of thousands (FastAPI, pydantic, id maps), and with the default 700
    # allocations between young collections it paid ~25% of its throughput for them.
    # Freezing what loading created and collecting the young less often gave it back.
    gc_freeze: bool = Field(True, description="exempt objects alive after loading from GC")
    gc_gen0_threshold: int = Field(
        20_000, ge=0, description="allocations between young GC runs; 0 keeps Python's default"
    )
    # ONNX Runtime computes without the GIL but must take it back to return its result; with
    # the event loop busy, Python's default 5 ms switch interval made every inference call
    # wait ~5 ms for it (measured: 3x fewer ORT runs next to a busy Python thread).
    gil_switch_interval_s: float = Field(
        0.0002, gt=0.0, le=0.1, description="sys.setswitchinterval for the serving process"
    )
    otel_telemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (off: its per-request provider checks cost "
        "~4 µs; the service's own metrics are Prometheus)",
    )
    loop_lag_interval_s: float = Field(
        0.1, ge=0.0, le=60.0, description="event-loop lag sampling period (0 = off)"
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    request_timeout_s: float = Field(1.0, gt=0.0, le=60.0)
    max_k: int = Field(1000, ge=1)
    max_history_len: int = Field(10_000, ge=1, description="longer histories are refused (422)")
    max_batch_requests: int = Field(256, ge=1, description="users per /v1/recommend/batch call")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    load_retry_s: float = Field(5.0, gt=0.0, description="retry period while the store fails")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("variants")
    @classmethod
    def _valid_variants(cls, value: dict[str, str]) -> dict[str, str]:
        for name, ref in value.items():
            if not re.match(VARIANT_PATTERN, name):
                raise ValueError(f"variant name {name!r}: use letters, digits, '_', '.', '-'")
            if not _MODEL_REF.match(ref):
                raise ValueError(f"variant {name!r}: {ref!r} is not NAME, NAME@N or NAME@latest")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        unknown = sorted(set(self.weights) - set(self.variants))
        if unknown:
            raise ValueError(f"weights name unknown variants {unknown}; known: {self.known}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be >= 0, got {self.weights}")
        for field in ("shadow_variant", "reference_variant"):
            name = getattr(self, field)
            if name is not None and name not in self.variants:
                raise ValueError(f"{field} {name!r} is not a variant; known: {self.known}")
        return self

    @property
    def known(self) -> list[str]:
        return sorted(self.variants)

    def routing_weights(self) -> dict[str, float]:
        """Weights from settings; with none given, traffic splits evenly over all variants."""
        if self.weights:
            return {name: self.weights.get(name, 0.0) for name in self.variants}
        return {name: 1.0 for name in self.variants}
