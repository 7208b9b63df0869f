"""PostgreSQL fixtures (imported by the conftests that need them): one real server for the session,
a fresh schema per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks import postgres_server
from benchmarks.postgres_server import PostgresServer, PostgresUnavailableError


def start_or_skip() -> PostgresServer:
    try:
        return postgres_server.acquire()
    except PostgresUnavailableError as reason:
        if os.environ.get("CI"):  # CI installs what it needs: failing to is a failure, not a skip
            pytest.fail(f"PostgreSQL unavailable in CI: {reason}")
        pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_or_skip()
    yield server
    postgres_server.release()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A libpq URL (unix socket) whose tables live in a schema of their own."""
    return postgres_server.new_schema_url(postgres)
