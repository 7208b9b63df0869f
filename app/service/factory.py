"""Settings -> a started TaskService (encoder loaded and warmed, tasks restored, queue running)."""

from __future__ import annotations

from app.encoder import create_encoder
from app.settings import Settings
from app.store import LocalDirStore

from .core import TaskService


def open_service(settings: Settings) -> TaskService:
    encoder, fallback = create_encoder(settings)
    store = LocalDirStore(settings.data_dir / "tasks")
    service = TaskService(settings, encoder, store, fallback=fallback)
    service.start()
    return service
