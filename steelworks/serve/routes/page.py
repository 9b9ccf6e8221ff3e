"""The web chat page, ``GET /`` and ``GET /chat``: static/chat.html as it is.

The page is static (no model data in it), so it loads without the API key; it asks for the
key and sends it with every API call, which is where auth applies.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

CHAT_PAGE = Path(__file__).resolve().parents[1] / "static" / "chat.html"

router = APIRouter()


@router.get("/", include_in_schema=False)
@router.get("/chat", include_in_schema=False)
async def chat_page() -> HTMLResponse:
    return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))
