"""`shotcache serve`: uvicorn running the HTTP layer's app factory, one process (one model copy).

The HTTP layer (api/) sits above app/, so it is named here, not imported: uvicorn imports
`api.main:create_app`, which reads the settings from the environment. Command-line overrides are
passed on as the SHOTCACHE_ variables they stand for.

uvicorn's event loop and HTTP parser are chosen explicitly: uvloop and httptools (runtime dependencies)
when they import, else asyncio and h11 with a log line saying so, so a host without them still serves
and says why it is slower. uvicorn's own "auto" would fall back silently.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import uvicorn

from .settings import Settings

APP_FACTORY = "api.main:create_app"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transport:
    """uvicorn's `loop` and `http` settings."""

    loop: str
    http: str


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def transport() -> Transport:
    """uvloop + httptools where importable; asyncio / h11 (logged) for what is missing."""
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    missing = [name for name, used in (("uvloop", loop), ("httptools", http)) if used != name]
    if missing:
        log.warning(
            "serving with loop=%s http=%s: %s not importable (slower request path)", loop, http, ", ".join(missing)
        )
    return Transport(loop=loop, http=http)


def serve(settings: Settings, overrides: Mapping[str, object]) -> None:
    for name, value in overrides.items():
        os.environ[f"SHOTCACHE_{name.upper()}"] = str(value)
    chosen = transport()
    log.info("uvicorn loop=%s http=%s", chosen.loop, chosen.http)
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        workers=1,
        loop=chosen.loop,
        http=chosen.http,
    )
