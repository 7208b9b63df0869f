"""In-process `TaskService` fixtures: no HTTP, the real stand-in encoder, a fresh store per test, and
one event loop on a thread of its own (as uvicorn's), which test threads submit coroutines to."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from app.service import TaskService
from app.settings import Settings
from app.store import LocalDirStore
from benchmarks.server_process import link_model
from tests.api.conftest import Shot, cifar_images

T = TypeVar("T")


class Loop:
    """An event loop running on its own thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    runner = Loop()
    yield runner
    runner.close()


def make_service(encoder: Any, model_data_dir: Path, data_dir: Path, **overrides: Any) -> TaskService:
    link_model(data_dir, model_data_dir)
    settings = Settings(**{"model": "offline", "data_dir": data_dir, "threads": 2, "workers": 2, **overrides})
    service = TaskService(settings, encoder, LocalDirStore(data_dir / "tasks"), fallback=None)
    service.start()
    return service


@pytest.fixture
def service(encoder: Any, model_data_dir: Path, tmp_path: Path) -> Iterator[TaskService]:
    svc = make_service(encoder, model_data_dir, tmp_path / "data", max_pending_builds=8)
    yield svc
    svc.close()


def uploads(shots: list[Shot] | list[Path]) -> list[Any]:
    from app.service import UploadedImage

    paths = [s[0] if isinstance(s, tuple) else s for s in shots]
    return [UploadedImage(p.name, p.read_bytes()) for p in paths]


__all__ = ["Loop", "cifar_images", "make_service", "uploads"]
