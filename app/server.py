"""`shotcache serve`: uvicorn running the HTTP layer's app factory, one process (one model copy).

The HTTP layer (api/) sits above app/, so it is named here, not imported: uvicorn imports
`api.main:create_app`, which reads the settings from the environment. Command-line overrides are
passed on as the SHOTCACHE_ variables they stand for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import uvicorn

from .settings import Settings

APP_FACTORY = "api.main:create_app"


def serve(settings: Settings, overrides: Mapping[str, object]) -> None:
    for name, value in overrides.items():
        os.environ[f"SHOTCACHE_{name.upper()}"] = str(value)
    uvicorn.run(
        APP_FACTORY, factory=True, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1
    )
