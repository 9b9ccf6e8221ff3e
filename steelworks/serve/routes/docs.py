"""The OpenAPI schema and its two viewers: ``GET /openapi.json``, ``/docs`` (Swagger UI) and
``/redoc``, in place of FastAPI's own (which build_app turns off) so that they sit behind the
API key when one is set: the schema lists every route and field. (With a key, a browser
cannot send the header; fetch the schema with it, e.g.
``curl -H "Authorization: Bearer $STEELWORKS_API_KEY" .../openapi.json``.)"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from steelworks.serve.routes.state import require_key

router = APIRouter(dependencies=[Depends(require_key)], include_in_schema=False)


def _schema_url(request: Request) -> str:
    """Where the viewers fetch the schema: under Ray Serve's route prefix too."""
    return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"


@router.get("/openapi.json")
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=_schema_url(request), title="steelworks API")


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_schema_url(request), title="steelworks API")
