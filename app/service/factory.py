"""Settings -> a started TaskService (encoder loaded and warmed, tasks restored, queue running)."""

from __future__ import annotations

from collections.abc import Callable

from app.encoder import Encoder, create_encoder
from app.settings import Settings
from app.store.factory import open_store

from .core import TaskService

# Settings -> the encoder and, for a stand-in fallback, why. `create_encoder` loads the model in this
# process; an engine that serves the model elsewhere (api/ray_encoder.py) passes its own.
EncoderFactory = Callable[[Settings], tuple[Encoder, str | None]]


def open_service(settings: Settings, *, encoders: EncoderFactory = create_encoder) -> TaskService:
    store = open_store(settings)  # first: an unreachable store fails in seconds, not after the model loads
    encoder, fallback = encoders(settings)
    service = TaskService(settings, encoder, store, fallback=fallback)
    service.start()
    return service
