"""The running service: loaded variants with their batchers, the router, shadow traffic.

Hot swap: a new version is loaded, verified and warmed up off the event loop while the old
one serves; then the variant's entry is replaced in one assignment. Requests that already
hold the old entry finish on it (its batcher drains before it closes); a failed load leaves
the old entry untouched.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app.batching import BatcherConfig, BatchObserver, DynamicBatcher
from app.engines import TorchModuleFactory
from app.metrics import Metrics
from app.model import LoadedModel, Query, Ranked
from app.overload import RefusalPacer
from app.routing import Router
from app.settings import Settings
from model_store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    model: LoadedModel
    batcher: DynamicBatcher[Query, Ranked]


@dataclass(slots=True)
class Answer:
    variant: str
    model_version: str
    ranked: Ranked
    source: str
    unknown_items: int


class Service:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        torch_factory: TorchModuleFactory | None = None,
    ) -> None:
        self.settings = settings
        self.torch_factory = torch_factory  # builds the torch engine's module (app/engines.py)
        self.metrics = metrics
        self.store = ModelStore(settings.store)
        self.router = Router(settings.routing_weights(), settings.experiment_salt)
        for name, weight in self.router.weights.items():
            metrics.routing_weight.labels(name).set(weight)
        self.variants: dict[str, Variant] = {}
        self._load_failure: str | None = "starting: variants not loaded yet"
        self._unhealthy: set[str] = set()  # variants whose batch consumer is restarting
        n_variants = max(1, len(settings.variants))
        self.executor = ThreadPoolExecutor(
            # the live slots of every variant, plus one for loading
            max_workers=n_variants * settings.batch.max_inflight_batches + 1,
            thread_name_prefix="inference",
            initializer=_lower_priority,
            initargs=(settings.inference_nice,),
        )
        # Shadow inference only on CPU nobody else wants (SCHED_IDLE): on the measured
        # machine a slow candidate at fraction 0.5 otherwise cost the live variant 17% of
        # its throughput and 20% on p99 (docs/results/2026-12-06-serving-batcher.md).
        self.shadow_executor = ThreadPoolExecutor(
            max_workers=n_variants, thread_name_prefix="shadow", initializer=_idle_priority
        )
        self.refusals = RefusalPacer(self.served_per_s)
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def not_ready_reason(self) -> str | None:
        """Why requests cannot be served now: loading, or a batch consumer restarting."""
        if self._load_failure is not None:
            return self._load_failure
        broken = [f"variant {n!r}: {v.batcher.failure}" for n, v in self.variants.items()
                  if not v.batcher.healthy]  # fmt: skip
        return "; ".join(broken) or None

    @property
    def ready(self) -> bool:
        # Read by every request: two attribute checks, not the reason string.
        return self._load_failure is None and not self._unhealthy

    def served_per_s(self) -> float:
        """What the variants' engines drain per second, as measured."""
        return sum(v.batcher.drain_per_s for v in self.variants.values())

    def saturated(self) -> bool:
        """Every variant is at its admission limit: a request would be refused anywhere."""
        return bool(self.variants) and all(v.batcher.full for v in self.variants.values())

    # -- loading ---------------------------------------------------------------------------

    def _load_model(self, name: str, ref: str) -> LoadedModel:
        s = self.settings
        model = LoadedModel(
            self.store, ref, s.engine, s.intra_op_threads, s.batch.length_buckets,
            self.torch_factory,
        )  # fmt: skip
        warm_s = model.warm_up(s.batch.max_batch_size)
        log.info("variant %s: %s on %s, warm-up %.2f s", name, model.ref, model.engine.name, warm_s)
        return model

    def _make_variant(self, name: str, model: LoadedModel) -> Variant:
        m, b = self.metrics, self.settings.batch
        observer = BatchObserver(
            queue_depth=m.queue_depth.labels(name).set,
            batch=lambda size, compute_s: (
                m.batch_size.labels(name).observe(size),
                m.inference.labels(name).observe(compute_s),
            ),
            queue_wait=m.queue_wait.labels(name).observe,
            dropped=lambda reason: m.rejected.labels(name, reason).inc(),
            queue_limit=m.queue_limit.labels(name).set,
            restarted=m.batcher_restarts.labels(name).inc,
            shadow_dropped=m.shadow_dropped.labels(name).inc,
            health=lambda ok: self._unhealthy.discard(name) if ok else self._unhealthy.add(name),
        )
        config = BatcherConfig(
            max_batch_size=b.max_batch_size,
            max_wait_s=b.max_wait_s,
            max_queue_size=b.max_queue_size,
            max_inflight_batches=b.max_inflight_batches,
            max_queue_delay_s=b.max_queue_delay_s,
            inline_when_idle=b.inline_when_idle and model.runs_inline,
        )
        m.queue_capacity.labels(name).set(b.max_queue_size)
        batcher = DynamicBatcher(
            name, model.run_batch, self.executor, config, observer, self.shadow_executor
        )
        batcher.start()
        return Variant(name, model, batcher)

    def _publish_info(self, name: str, old: LoadedModel | None, new: LoadedModel) -> None:
        info = self.metrics.model_info
        if old is not None:
            info.remove(name, old.manifest.name, str(old.manifest.version), old.precision,
                        old.engine.name)  # fmt: skip
        info.labels(name, new.manifest.name, str(new.manifest.version), new.precision,
                    new.engine.name).set(1)  # fmt: skip
        self.metrics.variant_memory.labels(name).set(sum(new.memory_bytes.values()))

    async def load_all(self) -> None:
        """Load every configured variant; until all load, stay alive and say why not ready."""
        loop = asyncio.get_running_loop()
        while True:
            missing = [n for n in self.settings.variants if n not in self.variants]
            errors = []
            for name in missing:
                ref = self.settings.variants[name]
                try:
                    model = await loop.run_in_executor(self.executor, self._load_model, name, ref)
                except Exception as exc:
                    self.metrics.model_loads.labels(name, "failed").inc()
                    log.error("variant %s: %s", name, exc)
                    errors.append(f"variant {name!r}: {exc}")
                    continue
                self.metrics.model_loads.labels(name, "ok").inc()
                self.variants[name] = self._make_variant(name, model)
                self._publish_info(name, None, model)
            if not self.settings.variants:
                errors.append("no variants configured; set RECSYS_VARIANTS")
            if not errors:
                self._freeze_heap(collect=True)  # before the first request: no one waits
                self._load_failure = None
                self.metrics.ready.set(1)
                return
            self._load_failure = "; ".join(errors)
            await asyncio.sleep(self.settings.load_retry_s)

    async def reload(self, name: str, ref: str) -> Variant:
        """Swap `name` to `ref`: load and warm first; on failure the old version stays."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                model = await loop.run_in_executor(self.executor, self._load_model, name, ref)
            except Exception as exc:
                self.metrics.model_loads.labels(name, "failed").inc()
                log.error("variant %s: reload to %s refused, old version kept: %s", name, ref, exc)
                raise
            self.metrics.model_loads.labels(name, "ok").inc()
            old = self.variants.get(name)
            new = self._make_variant(name, model)
            self.variants[name] = new  # the switch: one assignment, no await in between
            self._unhealthy.discard(name)  # the old batcher's state leaves with it
            self._publish_info(name, old.model if old else None, model)
            if old is not None:
                self._spawn(old.batcher.close())
            self._freeze_heap(collect=False)
            return new

    def _freeze_heap(self, collect: bool) -> None:
        """Move what loading created out of the GC's reach (settings.gc_freeze says why).

        Only at start-up is there a full collection first. A hot reload only freezes: a full
        pass over the frozen heap stops every request for its duration (the event loop and
        the inference threads alike), while a replaced version is freed by reference counting
        as soon as its last in-flight batch lets go (its model graph holds no cycles)."""
        if self.settings.gc_freeze:
            if collect:
                gc.collect()
            gc.freeze()

    async def close(self) -> None:
        for variant in list(self.variants.values()):
            await variant.batcher.close(drain_timeout_s=5.0)
        for task in list(self._background):
            task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.shadow_executor.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- serving ---------------------------------------------------------------------------

    def prepare(self, variant: Variant, history: list[int | str], k: int, exclude: bool) -> tuple:
        model = variant.model
        known, unknown = model.map_history(history)
        if unknown:
            self.metrics.unknown_items.labels(variant.name).inc(unknown)
        query = Query(known[-model.max_len :], known if exclude else None, k)
        return query, unknown

    async def recommend(
        self, variant_name: str, history: list[int | str], k: int, exclude: bool
    ) -> Answer:
        variant = self.variants[variant_name]
        query, unknown = self.prepare(variant, history, k, exclude)
        if len(query.inputs) == 0:
            self.metrics.fallback.labels(variant_name).inc()
            ranked = variant.model.popular_top_k(k, None)
            return Answer(variant_name, variant.model.ref, ranked, "popular", unknown)
        ranked = await variant.batcher.submit(query, self.settings.request_timeout_s)
        return Answer(variant_name, variant.model.ref, ranked, "model", unknown)

    async def maybe_shadow(
        self, served: Answer, history: list[int | str], k: int, exclude: bool
    ) -> None:
        """Also run a sampled request on the candidate, after the response is sent."""
        candidate = self.settings.shadow_variant
        if (
            candidate is None
            or candidate == served.variant
            or served.source != "model"
            or candidate not in self.variants
            or not self.router.sample(self.settings.shadow_fraction)
        ):
            return
        self._spawn(self._shadow(candidate, served, history, k, exclude))

    async def _shadow(
        self, candidate: str, served: Answer, history: list[int | str], k: int, exclude: bool
    ) -> None:
        variant = self.variants[candidate]
        query, _ = self.prepare(variant, history, k, exclude)
        started = time.perf_counter()
        try:  # the shadow lane: never takes a live slot, never counts toward live admission
            ranked = await variant.batcher.submit_shadow(query, self.settings.request_timeout_s)
        except Exception:  # shadow traffic must never hurt the served path
            self.metrics.shadow_dropped.labels(candidate).inc()
            return
        if ranked is None:  # the lane was full (counted by the batcher)
            return
        self.metrics.shadow_duration.labels(candidate).observe(time.perf_counter() - started)
        agreement = top_k_overlap(served.ranked.items, ranked.items)
        self.metrics.shadow_agreement.labels(served.variant, candidate).observe(agreement)


def _idle_priority() -> None:
    """SCHED_IDLE for a shadow thread (and the ORT threads it starts): it runs only when no
    other thread of the machine wants the CPU. No privilege needed; Linux only."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:
            log.warning("could not give shadow threads idle priority: %s", exc)


def _lower_priority(nice: int) -> None:
    """Run inference threads (and the ORT threads they create) below the event loop: under
    overload the loop must still parse, refuse (429) and answer health checks at once."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:  # e.g. a sandbox without setpriority: serve anyway
            log.warning("could not lower inference thread priority: %s", exc)


def top_k_overlap(a: list[str], b: list[str]) -> float:
    """|a ∩ b| / max(len): 1.0 when both lists hold the same items."""
    n = max(len(a), len(b))
    return float(len(set(a) & set(b)) / n) if n else 1.0
