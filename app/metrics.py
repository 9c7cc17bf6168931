"""Every Prometheus metric of the service, declared once, on a registry per app instance.

Base units (seconds), `_total` counters, histograms (aggregatable across replicas, unlike
summaries), labels from small fixed sets: variant names come from settings, never user or
item ids. Latency buckets start at 100 µs because a batch-1 ONNX inference is sub-ms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
AGREEMENT_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "recsys_requests", "Recommendation requests by outcome", ["variant", "status"],
            registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "recsys_request_duration_seconds", "Time in the service per request (routing, "
            "queue, inference, top-k)", ["variant"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "recsys_queue_wait_seconds", "Time a request waited for its batch",
            ["variant"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inference = Histogram(
            "recsys_inference_duration_seconds", "Compute time of one batch (pad, engine, top-k)",
            ["variant"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "recsys_batch_size", "Requests per batch", ["variant"], buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "recsys_queue_depth", "Requests waiting per variant", ["variant"], registry=r
        )
        self.queue_capacity = Gauge(
            "recsys_queue_capacity", "max_queue_size per variant (for saturation alerts)",
            ["variant"], registry=r,
        )  # fmt: skip
        self.queue_limit = Gauge(
            "recsys_queue_limit", "Live requests a variant admits now: what it drains in "
            "max_queue_delay_s at its measured speed, capped by max_queue_size",
            ["variant"], registry=r,
        )  # fmt: skip
        self.refusal_delay = Histogram(
            "recsys_refusal_delay_seconds", "How long a refusal (429) was held before it was "
            "sent: 0 within the refusal pace, more in a retry storm (app/overload.py)",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batcher_restarts = Counter(
            "recsys_batcher_restarts", "Batch consumer crashes (each restarted)", ["variant"],
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "recsys_rejected", "Requests refused or dropped, by reason (queue_full, deadline, "
            "cancelled, closed)", ["variant", "reason"], registry=r,
        )  # fmt: skip
        self.unknown_items = Counter(
            "recsys_unknown_items", "History item ids not in the model's catalogue (dropped)",
            ["variant"], registry=r,
        )  # fmt: skip
        self.fallback = Counter(
            "recsys_fallback", "Requests answered with popular items (no known history)",
            ["variant"], registry=r,
        )  # fmt: skip
        self.shadow_agreement = Histogram(
            "recsys_shadow_agreement", "Top-k overlap of a shadow candidate with the served "
            "answer", ["variant", "candidate"], buckets=AGREEMENT_BUCKETS, registry=r,
        )  # fmt: skip
        self.shadow_duration = Histogram(
            "recsys_shadow_duration_seconds", "Latency of shadow requests on the candidate",
            ["candidate"], buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "recsys_shadow_dropped", "Shadow requests not run (shadow lane full, or failed)",
            ["candidate"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "recsys_model_info", "1 for the model version each variant serves",
            ["variant", "model", "version", "precision", "engine"], registry=r,
        )  # fmt: skip
        self.variant_memory = Gauge(
            "recsys_variant_memory_bytes", "Bytes a variant holds or maps: model file, item "
            "matrix, ANN index and scorer tables (mapped pages count once they are read)",
            ["variant"], registry=r,
        )  # fmt: skip
        self.model_loads = Counter(
            "recsys_model_loads", "Model version loads by result (ok, failed)",
            ["variant", "result"], registry=r,
        )  # fmt: skip
        self.admin_auth_failures = Counter(
            "recsys_admin_auth_failures", "Admin calls refused for a missing or wrong token",
            registry=r,
        )  # fmt: skip
        self.loop_lag = Histogram(
            "recsys_event_loop_lag_seconds", "How late a timer on the event loop fires (every "
            "parse, refusal and health check waits this long before it starts)",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.ready = Gauge("recsys_ready", "1 when every variant is loaded", registry=r)
        self.routing_weight = Gauge(
            "recsys_routing_weight", "Traffic share per variant", ["variant"], registry=r
        )
