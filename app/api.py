"""HTTP routes: recommend (single and batch), variants, compare, health, readiness, admin."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask

from app.batching import BatcherClosedError, DeadlineError, QueueFullError
from app.compare import comparison, render_html
from app.errors import ApiError
from app.routing import UnknownVariantError
from app.schemas import (
    FAST_MODELS,
    BatchRecommendRequest,
    BatchRecommendResponse,
    ErrorBody,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    RoutingUpdate,
)
from app.service import Answer, Service
from app.settings import VARIANT_PATTERN

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Content-Length header is not a number",
        404: "unknown variant",
        413: "body too large",
        415: "body is not JSON",
        422: "invalid request",
        429: "overloaded: retry after the Retry-After header",
        500: "inference failed (the body holds a request id)",
        503: "not ready: variants still loading or failing",
        504: "no result within the request deadline",
    }.items()
}


class DirectRoute(APIRoute):
    """A route whose endpoint takes the Request and returns a Response with nothing in
    between: no dependency solving, no response-model serialization (FastAPI's documented
    `get_route_handler` hook). Still an APIRoute, so it stays in the OpenAPI schema."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


router = APIRouter()
hot = APIRouter(route_class=DirectRoute)  # the recommend routes; `app.main` includes both
_VARIANT = re.compile(VARIANT_PATTERN)
Body = TypeVar("Body", bound=BaseModel)
# Models the hot routes parse themselves; `app.main` adds them to the OpenAPI components.
BODY_MODELS: tuple[type[BaseModel], ...] = (RecommendRequest, BatchRecommendRequest)


def _not_json(raw: bytes, error: Any) -> str:
    if not raw.strip():
        return "body is empty; send a JSON object"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "body is not valid JSON (not UTF-8 text)"
    why = str(error.get("ctx", {}).get("error", "parse error"))
    if why.startswith("recursion limit exceeded"):
        why = "nested too deeply"
    return f"body is not valid JSON ({why})"


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a route that parses its own body: the fuzzer and clients read this."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
        "parameters": [{
            "name": "X-Variant", "in": "header", "required": False,
            "description": "force a variant",
            "schema": {"type": "string", "pattern": VARIANT_PATTERN},
        }],
    }  # fmt: skip


async def _parse(request: Request, model: type[Body]) -> tuple[Body, str | None]:
    """The body validated in one pass of pydantic's JSON parser, and the X-Variant header.

    The hot routes do this instead of declaring a body parameter: FastAPI's way (json.loads,
    then validation of the Python objects, then dependency solving) cost more per request
    than everything else the service does (measured with wrk; README, serving).
    """
    raw = await request.body()
    fast = FAST_MODELS.get(model)
    if fast is not None:
        try:  # plain integer ids: a third of the full union's cost (app/schemas.py)
            body = fast.model_validate_json(raw)
            return body, _variant_header(request)  # type: ignore[return-value]
        except ValidationError:
            pass  # string ids, integral floats or a bad body: the full model decides
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise ApiError(422, "invalid_request", _not_json(raw, errors[0])) from None
        raise RequestValidationError(errors) from None
    return body, _variant_header(request)


def _variant_header(request: Request) -> str | None:
    variant = request.headers.get("x-variant")
    if variant is not None and not _VARIANT.match(variant):
        raise ApiError(
            422, "invalid_request", f"header.X-Variant: String should match pattern "
            f"'{VARIANT_PATTERN}'",
        )  # fmt: skip
    return variant


async def get_service(request: Request) -> Service:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread
    # hop per request that cost ~70% of the throughput under load (measured with wrk).
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def _json(payload: Any, status: int = 200, background: BackgroundTask | None = None) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json",
                    background=background)  # fmt: skip


def _answer_json(a: Answer) -> dict[str, Any]:
    r = a.ranked
    return {
        "items": [{"item_id": i, "score": s} for i, s in zip(r.items, r.scores, strict=True)],
        "variant": a.variant,
        "model_version": a.model_version,
        "source": a.source,
        "unknown_items": a.unknown_items,
    }


def _check_request(service: Service, body: RecommendRequest) -> None:
    s = service.settings
    if not service.ready:
        raise ApiError(503, "not_ready", f"service not ready: {service.not_ready_reason}")
    if len(body.history) > s.max_history_len:
        raise ApiError(
            422, "history_too_long",
            f"history has {len(body.history)} items; the limit is {s.max_history_len} "
            "(send the most recent items)",
        )  # fmt: skip
    if body.k > s.max_k:
        raise ApiError(422, "k_too_large", f"k={body.k} is above the limit max_k={s.max_k}")


async def _serve_one(
    service: Service, body: RecommendRequest, header_variant: str | None
) -> Answer:
    """Route, run, count; maps batcher errors to HTTP errors."""
    started = time.perf_counter()
    try:
        name = service.router.assign(body.user_id, header_variant or body.variant)
    except UnknownVariantError as exc:
        raise ApiError(404, "unknown_variant", str(exc)) from None
    m = service.metrics
    try:
        answer = await service.recommend(name, body.history, body.k, body.exclude_history)
    except QueueFullError as exc:
        m.requests.labels(name, "queue_full").inc()
        m.rejected.labels(name, "queue_full").inc()
        raise ApiError(429, "overloaded", str(exc), retry_after_s=exc.retry_after_s) from None
    except DeadlineError as exc:
        m.requests.labels(name, "deadline").inc()
        raise ApiError(504, "deadline", f"variant {name!r}: {exc}") from None
    except BatcherClosedError as exc:
        m.requests.labels(name, "closed").inc()
        raise ApiError(503, "closed", str(exc), retry_after_s=1.0) from None
    except Exception as exc:
        m.requests.labels(name, "error").inc()
        raise ApiError(500, "inference_failed", f"variant {name!r}: inference failed") from exc
    m.requests.labels(name, "ok").inc()
    m.request_duration.labels(name).observe(time.perf_counter() - started)
    return answer


def _hot_post(path: str, response: type[BaseModel], body: type[BaseModel]) -> Callable[..., Any]:
    """A recommend route: parses its own `body` model, documented like a declared one."""
    return hot.post(path, response_model=response, responses=ERRORS,
                    openapi_extra=_body_doc(body))  # fmt: skip


@_hot_post("/v1/recommend", RecommendResponse, RecommendRequest)
async def recommend(request: Request) -> Response:
    """Top-k items for one user's history (original item ids, oldest first)."""
    service: Service = request.app.state.service
    body, x_variant = await _parse(request, RecommendRequest)
    _check_request(service, body)
    answer = await _serve_one(service, body, x_variant)
    shadow = None
    if service.settings.shadow_variant is not None:
        shadow = BackgroundTask(
            service.maybe_shadow, answer, body.history, body.k, body.exclude_history
        )
    return _json(_answer_json(answer), background=shadow)


@_hot_post("/v1/recommend/batch", BatchRecommendResponse, BatchRecommendRequest)
async def recommend_batch(request: Request) -> Response:
    """Many users in one call; each is routed on its own. Fails as a whole on any error."""
    service: Service = request.app.state.service
    body, x_variant = await _parse(request, BatchRecommendRequest)
    limit = service.settings.max_batch_requests
    if len(body.requests) > limit:
        raise ApiError(
            422, "batch_too_large", f"{len(body.requests)} requests; the limit is {limit}"
        )
    for item in body.requests:
        _check_request(service, item)
    answers = await asyncio.gather(*(_serve_one(service, r, x_variant) for r in body.requests))
    return _json({"results": [_answer_json(a) for a in answers]})


@router.get("/v1/variants")
async def variants(service: ServiceDep) -> dict[str, Any]:
    """Each loaded variant: its model version, engine, precision, size, offline metrics."""
    return {
        "variants": {
            name: {**v.model.summary(), "weight": service.router.weights.get(name, 0.0)}
            for name, v in sorted(service.variants.items())
        },
        "shadow": {
            "candidate": service.settings.shadow_variant,
            "fraction": service.settings.shadow_fraction,
        },
    }


@router.get("/v1/compare")
async def compare_json(service: ServiceDep) -> dict[str, Any]:
    """Offline quality (manifests) next to live latency percentiles and shadow agreement."""
    return comparison(service)


@router.get("/compare", response_class=HTMLResponse)
async def compare_html(service: ServiceDep) -> HTMLResponse:
    return HTMLResponse(render_html(comparison(service)))


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers (it may still be loading; see /readyz)."""
    return {"status": "alive"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(service: ServiceDep) -> Response:
    """Ready once every variant is loaded and warmed up; otherwise 503 with the reason."""
    if not service.ready:
        return _json({"error": f"not ready: {service.not_ready_reason}", "code": "not_ready"}, 503)
    return _json({"status": "ready", "variants": sorted(service.variants)})


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}}})
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def require_admin(
    service: ServiceDep,
    # No max_length here: an over-long header must be a counted 401, not an uncounted 422.
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """Bearer token, compared in constant time; no token configured = admin disabled."""
    token = service.settings.admin_token
    if token is None:
        raise ApiError(404, "admin_disabled", "admin endpoints are disabled (no token set)")
    scheme, _, given = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme != "Bearer" or not hmac.compare_digest(given.encode(), expected):
        service.metrics.admin_auth_failures.inc()
        raise ApiError(401, "unauthorized", "missing or wrong bearer token", bearer=True)


AdminDep = Depends(require_admin)
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "unknown variant, or admin disabled (no token set)"},
}


@router.get("/admin/routing", dependencies=[AdminDep], responses=ADMIN_ERRORS)
async def get_routing(service: ServiceDep) -> dict[str, Any]:
    return {"weights": service.router.weights, "salt": service.settings.experiment_salt}


@router.put("/admin/routing", dependencies=[AdminDep], responses=ADMIN_ERRORS)
async def put_routing(update: RoutingUpdate, service: ServiceDep) -> dict[str, Any]:
    """Replace the traffic split; variants left out get weight 0."""
    unknown = sorted(set(update.weights) - set(service.variants))
    if unknown:
        raise ApiError(404, "unknown_variant", f"unknown variants {unknown}; "
                       f"known: {sorted(service.variants)}")  # fmt: skip
    weights = {name: update.weights.get(name, 0.0) for name in service.variants}
    try:
        service.router.set_weights(weights)
    except ValueError as exc:
        raise ApiError(422, "invalid_weights", str(exc)) from None
    for name, weight in service.router.weights.items():
        service.metrics.routing_weight.labels(name).set(weight)
    return {"weights": service.router.weights}


@router.post("/admin/reload", dependencies=[AdminDep], responses={
    **ADMIN_ERRORS, 409: {"model": ErrorBody, "description": "reload failed; old version serves"}
})  # fmt: skip
async def reload(req: ReloadRequest, service: ServiceDep) -> dict[str, Any]:
    """Swap a variant to another stored version; the old one serves until the new is warm."""
    if req.variant not in service.variants:
        raise ApiError(404, "unknown_variant", f"unknown variant {req.variant!r}; "
                       f"known: {sorted(service.variants)}")  # fmt: skip
    try:
        variant = await service.reload(req.variant, req.model)
    except Exception as exc:
        raise ApiError(
            409, "reload_failed", f"{exc}; variant {req.variant!r} keeps serving its old version"
        ) from None
    return {"variant": req.variant, **variant.model.summary()}
