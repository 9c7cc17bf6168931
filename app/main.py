"""`create_app(settings)`: a factory, nothing built at import time.

The lifespan starts loading the variants in the background and returns at once, so the
process answers `/healthz` (alive) while `/readyz` says 503 with the reason until every
variant is loaded, verified and warmed up. A store that fails keeps the process alive and
is retried every `load_retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import BODY_MODELS, hot, router
from app.engines import TorchModuleFactory
from app.errors import BodyGuard, install_error_handlers
from app.metrics import Metrics
from app.service import Service
from app.settings import Settings

log = logging.getLogger("app")
# FastAPI's native OpenTelemetry checks its providers on every request (environment lookups
# included) even when none is configured; the service exports Prometheus metrics instead.
_NO_TELEMETRY: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


def create_app(
    settings: Settings | None = None, torch_factory: TorchModuleFactory | None = None
) -> FastAPI:
    """`torch_factory` builds the torch engine's module from a manifest's architecture
    (`app` never imports `compression`; `recsys serve` passes one)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sys.setswitchinterval(settings.gil_switch_interval_s)
        if settings.gc_gen0_threshold:
            gc.set_threshold(settings.gc_gen0_threshold, *gc.get_threshold()[1:])
        service = Service(settings, Metrics(), torch_factory)
        app.state.service = service
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(service.load_all())]
        if settings.loop_lag_interval_s:
            tasks.append(loop.create_task(watch_loop_lag(service, settings.loop_lag_interval_s)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await service.close()

    app = FastAPI(
        title="recsys-serve",
        summary="Low-latency Transformer recommendations with batching, A/B and metrics",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=None if settings.otel_telemetry else _NO_TELEMETRY,
    )
    app.include_router(hot)
    app.include_router(router)
    install_error_handlers(app)
    json_routes = {  # from the router: FastAPI may wrap included routes in app.routes
        (method, route.path)
        for route in [*hot.routes, *router.routes]
        if isinstance(route, APIRoute)
        and (route.body_field is not None or "requestBody" in (route.openapi_extra or {}))
        for method in route.methods
    }
    _document_bodies(app, settings)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes, json_routes=json_routes)
    return app


async def watch_loop_lag(service: Service, interval_s: float) -> None:
    """Observe how late a sleep of `interval_s` wakes up: the event loop's own queueing
    delay, which every request (a refusal included) pays before any of its code runs."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval_s)
        service.metrics.loop_lag.observe(max(0.0, loop.time() - started - interval_s))


def _document_bodies(app: FastAPI, settings: Settings) -> None:
    """Put the models of self-parsed bodies into the schema's components (see `app.api`),
    with this service's own limits: a request the schema allows is one the service serves,
    so generated clients and fuzzers see the same bounds the server enforces."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
            _apply_limits(components, settings)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _apply_limits(components: dict[str, Any], settings: Settings) -> None:
    """The settings' run-time limits, where they are stricter than the static models'."""

    def tighten(prop: dict[str, Any], key: str, limit: int) -> None:
        prop[key] = min(int(prop.get(key, limit)), limit)

    request = components["RecommendRequest"]["properties"]
    tighten(request["k"], "maximum", settings.max_k)
    tighten(request["history"], "maxItems", settings.max_history_len)
    batch = components["BatchRecommendRequest"]["properties"]
    tighten(batch["requests"], "maxItems", settings.max_batch_requests)
