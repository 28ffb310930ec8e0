"""The built-in playground: `GET /` (redirects to /playground), `GET /playground` (one HTML page),
`GET /playground/static/<name>` (its script and style sheet, package files under `server/playground/`) and
`GET /status` (the live panel's numbers, no auth).

The page is plain HTML/JS/CSS with no build step and no request to any other host (its Content-Security-Policy
allows only this origin), so it works offline. Static files are looked up by name in a fixed folder: a name
must be a plain file name (letters, digits, `-`, `_`, one dot and a known extension), so `..`, slashes and
hidden files are refused with a 404 before the file system is touched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel
from sparsedial.engine.api import EngineProtocol

from .deps import ServerState, get_engine, get_state
from .errors import APIError
from .protocol import ErrorResponse

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".html": "text/html; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(?:js|css|html|png|svg)$")
# Only this origin: scripts, styles, fetches, images (data: for the empty favicon). No inline script.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

router = APIRouter(tags=["playground"])


class StatusResponse(BaseModel):
    """`GET /status`: what the playground's live panel shows."""

    model: str
    tiers: list[str]
    running: int
    waiting: int
    kv_slots_used: int
    kv_slots_total: int
    current_auto_tier: str
    default_tier: str
    mode: str


def static_path(name: str) -> Path | None:
    """The playground file called `name`, or None when the name is not a plain, known file name or no such
    file exists (never a path outside PLAYGROUND_DIR)."""
    if not _SAFE_NAME.fullmatch(name):
        return None
    path = PLAYGROUND_DIR / name
    if path.parent != PLAYGROUND_DIR or not path.is_file():
        return None
    return path


def _not_found(name: str) -> APIError:
    return APIError(404, f"no playground file {name!r}", code="not_found")


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/playground", status_code=307)


@router.get("/playground", include_in_schema=False)
async def playground() -> FileResponse:
    """The playground page (works before the engine has loaded; the page shows 'loading' until it has)."""
    path = static_path("index.html")
    if path is None:
        raise _not_found("index.html")
    return FileResponse(path, media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)


@router.get("/playground/static/{name:path}", include_in_schema=False)
async def playground_static(name: str) -> FileResponse:
    path = static_path(name)
    if path is None:
        raise _not_found(name)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=PAGE_HEADERS)


@router.get("/status", response_model=StatusResponse, responses={503: {"model": ErrorResponse}},
            summary="Engine load and tier policy, for dashboards (no auth)")
async def status(state: Annotated[ServerState, Depends(get_state)],
                 engine: Annotated[EngineProtocol, Depends(get_engine)]) -> StatusResponse:
    """Running and waiting requests, KV slots in use, the tier `auto` maps to now, the default tier and the
    policy mode; 503 while the engine loads."""
    s = engine.stats()
    p = engine.get_policy()
    return StatusResponse(model=state.model_id(engine), tiers=list(engine.tiers), running=s.running,
                          waiting=s.waiting, kv_slots_used=s.kv_slots_used, kv_slots_total=s.kv_slots_total,
                          current_auto_tier=s.current_auto_tier, default_tier=p.default_tier, mode=p.mode)
