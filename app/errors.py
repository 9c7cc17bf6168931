"""Every error leaves as JSON `{error, code, request_id?}`: no stack trace, no file path.

Also the body guard: a pure ASGI middleware that refuses oversized bodies (413) before any
parsing and non-JSON bodies (415) on the JSON endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_s: float | None = None,
        bearer: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s
        self.bearer = bearer


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    body = {"error": message, "code": code, **extra}
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if given.isalnum() and len(given) <= 64 else uuid.uuid4().hex


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def validation_message(exc: RequestValidationError) -> str:
    """`history.3: Input should be a valid integer` — the first problem, on one line."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{_where(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid')}{more}"


def _unparsable(exc: StarletteHTTPException) -> str | None:
    """Why the body could not be read, for FastAPI's 400 "error parsing the body"."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError):  # e.g. an integer with thousands of digits
        return "a number is too long"
    return "cannot be parsed"


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this request's path (for a 405's `Allow`)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if exc.bearer:
            headers["WWW-Authenticate"] = "Bearer"
        extra = {}
        if exc.status >= 500:
            extra["request_id"] = _request_id(request)
            if exc.status == 500:  # 503/504 are load, not faults: one line each would flood
                log.error("request %s: %s (%s)", extra["request_id"], exc.message, exc.__cause__)
        return error_response(exc.status, exc.code, exc.message, headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        why = _unparsable(exc)
        if why is not None:  # FastAPI's bare 400 for a body json.loads fails on without a position
            return error_response(422, "invalid_request", f"body is not valid JSON ({why})")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{exc.detail}: {request.method} {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists one route's methods; a path may have more
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, message, headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        request_id = _request_id(request)
        log.exception("request %s failed", request_id)
        return error_response(
            500, "internal_error", "internal error; report the request id", request_id=request_id
        )


class BodyGuard:
    """413 for bodies over `max_body_bytes` (by header, or counted while streaming), 415 for
    bodies that do not declare JSON. Runs before FastAPI reads or parses anything.

    `json_routes`: the (method, path) pairs that take a JSON body; only those get the 415, so
    a POST to a GET-only path still gets its 405 (None: every POST/PUT/PATCH)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        json_routes: set[tuple[str, str]] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.json_routes = json_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        limit = self.max_body_bytes
        if length is not None and not length.isdigit():
            await self._reject(send, 400, "bad_content_length", "Content-Length is not a number")
            return
        if length is not None and int(length) > limit:
            await self._reject(send, 413, "body_too_large", f"body over {limit} bytes")
            return
        route = (scope["method"], scope["path"])
        if self.json_routes is not None and route not in self.json_routes:
            await self.app(scope, receive, send)  # the router answers 404 or 405
            return
        if scope["path"].startswith("/v1/recommend") and (delay_s := self._saturated(scope)) >= 0:
            # Refused before the body is read or parsed: under overload, parsing the excess
            # would take the CPU that the accepted requests and health checks need. Past the
            # refusal pace (app/overload.py) the answer waits its turn: a timer, not CPU.
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            await self._reject(
                send, 429, "overloaded", "every variant's queue is full; retry later",
                [(b"retry-after", b"1")],
            )  # fmt: skip
            return
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            await self._reject(
                send, 415, "unsupported_media_type",
                f"content type {ctype.decode('latin-1') or 'missing'!r}; send application/json",
            )  # fmt: skip
            return
        # Buffer the (small) JSON body up to the limit, then replay it: refusing half-way
        # through the app's own body parsing would surface as a generic parse error.
        chunks, received, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await self._reject(send, 413, "body_too_large", f"body over {limit} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _saturated(scope: Scope) -> float:
        """-1 when the request may go on; else how long its refusal waits (seconds)."""
        state = getattr(scope.get("app"), "state", None)
        service = getattr(state, "service", None)
        if service is None or not service.saturated():
            return -1.0
        service.metrics.rejected.labels("none", "queue_full").inc()
        delay_s = service.refusals.delay_s(scope.get("client"))
        service.metrics.refusal_delay.observe(delay_s)
        return delay_s

    @staticmethod
    async def _reject(
        send: Send,
        status: int,
        code: str,
        message: str,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = orjson.dumps({"error": message, "code": code})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *(extra_headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
