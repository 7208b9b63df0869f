"""`shotcache serve`: uvicorn with the app factory, one process (one model copy)."""

from __future__ import annotations

import uvicorn

from .settings import Settings


def serve(settings: Settings) -> None:
    from api.main import create_app

    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1)
