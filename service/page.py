"""The shopper's page: GET / and its three static files (plain HTML, JS and CSS: no build step, no CDN)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

LOG = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# A fixed list rather than a StaticFiles mount: nothing else under service/ can be asked for by name.
FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# Revalidate on every load (FileResponse sends an ETag and Last-Modified): a new release shows at once.
HEADERS = {"Cache-Control": "no-cache"}

page_router = APIRouter(include_in_schema=False)


@page_router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)


@page_router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
