"""The per-app state of the serving app, and the dependencies routes reach it through.

``build_app`` (serve/app.py) stores one ``ServeState`` on ``app.state.serve``; a route takes
it as a parameter ``state: AppState``, a FastAPI dependency that reads ``request.app.state``
(how vLLM's OpenAI routers reach their engine client). Nothing per app lives at module level:
one process may hold several apps (the tests build one per engine and config), each with its
own engine, API key and eval jobs, while the routers themselves are shared and stateless.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from steelworks.inference.engine import EngineBase
from steelworks.serve.config import ServeConfig
from steelworks.serve.metrics import ServeMetrics
from steelworks.serve.protocol import APIError


@dataclass
class JobTable:
    """Background jobs by id, in creation order (dicts keep insertion order), kept for
    polling. Job threads and requests both touch it, hence the lock."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, job: dict[str, Any]) -> None:
        with self.lock:
            self.jobs[job["id"]] = job

    def get(self, jid: str) -> dict[str, Any] | None:
        with self.lock:
            return self.jobs.get(jid)

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` finished jobs (a report can be large, and a long-lived
        replica must not grow without bound); running ones always stay."""
        with self.lock:
            finished = [jid for jid, job in self.jobs.items() if job["status"] != "running"]
            for jid in finished[: max(0, len(finished) - keep)]:
                del self.jobs[jid]


@dataclass
class ServeState:
    """What every route of one app shares: built once by ``build_app``."""

    engine: EngineBase  # the built-in or the vLLM engine: routes use only EngineBase's API
    config: ServeConfig
    metrics: ServeMetrics
    model_name: str  # the id in /v1/models: config.model_name, else the engine's name
    created: int  # the model card's "created": when the app was built
    # Resolved once, when the app is built (config, else $STEELWORKS_API_KEY); never shown.
    api_key: str | None = field(default=None, repr=False)
    eval_jobs: JobTable = field(default_factory=JobTable)  # /v1/evals runs too big to wait for
    # One evaluation at a time per replica: evaluations share the engine with chat traffic.
    eval_lock: threading.Lock = field(default_factory=threading.Lock)


def get_state(request: Request) -> ServeState:
    """The state of the app serving ``request`` (a dependency: takes only the request, so
    it adds nothing to the OpenAPI schema)."""
    return request.app.state.serve


AppState = Annotated[ServeState, Depends(get_state)]


async def require_key(request: Request) -> None:
    """Every route but /health and the static chat page takes the API key, when one is set."""
    api_key = get_state(request).api_key
    if not api_key:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")
    # Constant-time, so the time of a refusal says nothing about how much of the key matched.
    if not secrets.compare_digest(key.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
