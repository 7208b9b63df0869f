"""The FastAPI application: lifespan loads the model once, restores tasks, starts the encoder queue."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from app import __version__
from app.service.factory import EncoderFactory, open_service
from app.settings import Settings, get_settings

from .auth import KeyRing
from .errors import install_error_handlers
from .http_metrics import HttpMetrics
from .limits import BodySizeLimit
from .routes import classify, health, page, shots, tasks

log = logging.getLogger(__name__)

DESCRIPTION = """Training-free few-shot image classification. POST a few labelled images to create a task;
classify any image against it with Tip-Adapter, Tip-X, APE, GDA or zero-shot CLIP, no training."""


def create_app(settings: Settings | None = None, *, encoders: EncoderFactory | None = None) -> FastAPI:
    """The app; `encoders` replaces the in-process encoder factory (the Ray engine's remote encoder)."""
    settings = settings or get_settings()
    keys = KeyRing(settings.api_keys, settings.admin_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if keys.open:
            log.warning("SHOTCACHE_API_KEYS is unset: the API is OPEN to anyone who can reach it (local use)")
        service = open_service(settings, encoders=encoders) if encoders else open_service(settings)
        app.state.service = service
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="shotcache", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.keys = keys
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(tasks.router)
    app.include_router(classify.router)
    app.include_router(shots.router)
    app.include_router(page.router)
    # The last added runs first: metrics see every answer, the body limit's 413s included.
    app.add_middleware(BodySizeLimit, max_bytes=int(settings.max_request_mb * 1024 * 1024))
    app.add_middleware(HttpMetrics)
    if keys.open:
        app.openapi = _without_auth(app.openapi)  # type: ignore[method-assign]
    return app


def _without_auth(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The schema of an open server: no security requirements and no 401/403 answers, as it gives none."""

    def schema() -> dict[str, Any]:
        document = openapi()  # FastAPI builds it once and caches it; editing it in place is idempotent
        document.get("components", {}).pop("securitySchemes", None)
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                operation.pop("security", None)
                for status in ("401", "403"):
                    operation.get("responses", {}).pop(status, None)
        document["info"]["description"] = DESCRIPTION + "\n\nThis server is open: SHOTCACHE_API_KEYS is unset."
        return document

    return schema
