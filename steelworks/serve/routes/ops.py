"""Operational routes: ``GET /health`` (liveness and readiness, public, for load balancers
and Kubernetes probes) and ``GET /metrics`` (Prometheus, behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from steelworks.serve.protocol import APIError
from steelworks.serve.routes.state import AppState, require_key

router = APIRouter()


@router.get("/health")
async def health(state: AppState) -> dict[str, str]:
    # Load balancers and Kubernetes probes read the status: a replica whose engine can no
    # longer serve (scheduler thread dead, engine process gone) must say so. Only the
    # engine's public check_health is called, so every engine defines its own failure.
    try:
        state.engine.check_health()
    except Exception as e:
        raise APIError(503, f"The engine cannot serve: {e}", type="server_error",
                       code="engine_unhealthy") from e
    return {"status": "ok", "model": state.model_name, "engine": state.engine.kind}


@router.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
async def prometheus(state: AppState) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
