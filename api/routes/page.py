"""The web page at `/`: static files shipped inside the package (api/static/), no build step, no CDN.

Only the files that are in that folder are served, by exact name; the page itself talks to the API
with the caller's key, so these routes need none.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = Path(__file__).resolve().parent.parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Revalidate on every load: a new release's page never mixes with an old cached module.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _files() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _TYPES}


_FILES = _files()

router = APIRouter(include_in_schema=False)


def _serve(path: Path) -> Response:
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/")
async def index() -> Response:
    return _serve(_FILES["index.html"])


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    path = _FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no static file {name!r}")
    return _serve(path)
