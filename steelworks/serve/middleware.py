"""ASGI middlewares of the app: the request-body limit and the request metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException

from steelworks.serve.metrics import ServeMetrics
from steelworks.serve.protocol import APIError


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413. A Content-Length
    over the limit is answered before any byte is read; a body without one (chunked upload)
    or longer than it claimed is counted as it arrives and cut off at the limit, so the
    server never buffers more than ``max_bytes`` of one request."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"Request body too large: the limit is {self.max_bytes} bytes "
                        f"(serve.max_request_bytes).", code="request_too_large")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._error().response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # fastapi's HTTPException: FastAPI re-raises it from body parsing (other
                    # exceptions there become a 400), and the app's handler writes the body.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """ASGI middleware: count each request by route and status, time it (until the last byte
    of a stream) and track requests in flight.

    Plain ASGI on purpose, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    wraps ``receive`` in a task group that swallows the ``http.disconnect`` message inside
    ``Request.is_disconnected()`` (its cancelled scope cancels the group on exit), so behind
    it a non-streaming generation never saw its client hang up and decoded to max_tokens
    (tests/test_serve_engine_faults.py)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped every handler

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.inflight.dec()
            route = scope.get("route")  # set by the router in the shared scope dict
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status, started)


