"""Settings -> a started TaskService (encoder loaded and warmed, tasks restored, queue running)."""

from __future__ import annotations

from app.encoder import create_encoder
from app.settings import Settings
from app.store.factory import open_store

from .core import TaskService


def open_service(settings: Settings) -> TaskService:
    store = open_store(settings)  # first: an unreachable store fails in seconds, not after the model loads
    encoder, fallback = create_encoder(settings)
    service = TaskService(settings, encoder, store, fallback=fallback)
    service.start()
    return service
