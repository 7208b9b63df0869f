"""The PostgreSQL server fixtures, and the contract suite's `backend` (local, postgres) and `store`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store import TaskStore
from tests.stores.backends import Backend, local_backend, postgres_backend
from tests.stores.fixtures import postgres, postgres_url

__all__ = ["backend", "postgres", "postgres_url", "store"]


@pytest.fixture(params=["local", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield local_backend(tmp_path / "tasks")
        return
    chosen = postgres_backend(request.getfixturevalue("postgres_url"))
    yield chosen
    for store in chosen._opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> TaskStore:
    return backend.open()
