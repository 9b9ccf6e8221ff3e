"""OpenAI-compatible HTTP API over an engine (``inference.EngineBase``: built-in or vLLM).
``build_app`` assembles the FastAPI app: its per-app state, middlewares, error handlers, and
the routers of serve/routes/ (one per concern: ops, page, docs, openai, evals). The same app
runs under plain uvicorn, FastAPI's TestClient and Ray Serve (deployment.py), so it is built
only here.

Errors always carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; bad
input is a 4xx, never a 500.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steelworks.inference.engine import EngineBase
from steelworks.inference.sampling import InvalidTextError
from steelworks.inference.scheduler import QueueFullError
from steelworks.serve.config import ServeConfig
from steelworks.serve.metrics import ServeMetrics
from steelworks.serve.middleware import BodyLimit, RequestMetrics
from steelworks.serve.protocol import APIError, validation_error
from steelworks.serve.routes import docs, evals, openai, ops, page
from steelworks.serve.routes.state import ServeState

logger = logging.getLogger("steelworks.serve")


# --- error handlers: every error leaves as OpenAI's error body -------------------------------

async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    if exc.status == 503:
        headers = {"Retry-After": "1"}
    return exc.response(headers)


async def _busy(_: Request, exc: QueueFullError) -> JSONResponse:
    # Every path into the engine (generation, prompt logprobs for echo, evals) can find its
    # queue full; whichever route it surfaces in, the client gets 503 and a retry hint.
    return APIError(503, f"The server is overloaded: {exc}.", type="server_error",
                    code="server_busy").response({"Retry-After": "1"})


async def _bad_text(_: Request, exc: InvalidTextError) -> JSONResponse:
    return APIError(400, str(exc), param=exc.param, code="invalid_value").response()


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()  # OpenAI answers 400 where FastAPI says 422


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()


async def _internal(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


ERROR_HANDLERS = {APIError: _api_error, QueueFullError: _busy, InvalidTextError: _bad_text,
                  RequestValidationError: _invalid, StarletteHTTPException: _http,
                  Exception: _internal}


def build_app(engine: EngineBase, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``config`` (name, API key, default length)."""
    model_name = config.model_name or engine.name
    # FastAPI's /docs, /redoc and /openapi.json are public; ours (routes/docs.py) take the key.
    app = FastAPI(title="steelworks", version="0.1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = ServeMetrics(model_name, engine.stats)
    app.state.serve = ServeState(
        engine=engine, config=config, metrics=metrics, model_name=model_name,
        created=int(time.time()),
        api_key=config.resolve_api_key(),  # config, else $STEELWORKS_API_KEY (config.api_key_env)
    )
    # Added before RequestMetrics, so it sits inside it: 413s are counted like other answers.
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: the outermost
    for exc_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    # In this order, the order of the paths in the OpenAPI schema.
    for module in (ops, page, docs, openai, evals):
        app.include_router(module.router)
    return app
