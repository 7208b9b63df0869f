"""What is PostgresStore's own (the shared contract is in test_store_contract.py): its rows, its schema
migrations, its secrets, outages (SIGKILL during saves is in the contract suite: test_store_crashes.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from app.settings import Settings
from app.store import LocalDirStore, TaskSnapshot, VersionConflict
from app.store.base import StoreUnavailable
from app.store.factory import describe_store, open_store
from app.store.postgres import PostgresStore, describe_url
from app.store.postgres_schema import LATEST, SchemaTooNewError
from benchmarks.postgres_server import PostgresServer
from tests.stores.snapshots import assert_identical, make_snapshot

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(postgres_url, timeout_s=1.0)
    yield opened
    opened.close()


def rows(url: str, query: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query.encode(), params).fetchall()


def snapshot_with(version: int, **arrays: np.ndarray[Any, Any]) -> TaskSnapshot:
    return TaskSnapshot("acme", "cats", version, {"version": version}, arrays)


def test_a_save_keeps_one_version_and_shares_unchanged_blobs(store: PostgresStore, postgres_url: str) -> None:
    text = np.arange(64, dtype=np.float32)
    store.save(snapshot_with(1, text=text, keys=np.ones((4, 8), np.float32)))
    text_sha = rows(postgres_url, "SELECT sha256 FROM shotcache_array WHERE name = 'text'")[0][0]
    written_by = rows(postgres_url, "SELECT xmin::text FROM shotcache_blob WHERE sha256 = %s", text_sha)
    store.save(snapshot_with(2, text=text, keys=np.ones((6, 8), np.float32)))

    assert rows(postgres_url, "SELECT version FROM shotcache_version") == [(2,)]
    assert rows(postgres_url, "SELECT version FROM shotcache_task") == [(2,)]
    assert len(rows(postgres_url, "SELECT 1 FROM shotcache_blob")) == 2  # the old keys' blob is gone
    # The unchanged array's blob is the very row version 1 wrote: not sent or written again.
    assert rows(postgres_url, "SELECT xmin::text FROM shotcache_blob WHERE sha256 = %s", text_sha) == written_by
    assert_identical(store.load("acme", "cats"), snapshot_with(2, text=text, keys=np.ones((6, 8), np.float32)))


def test_loaded_arrays_are_read_only_views(store: PostgresStore) -> None:
    store.save(snapshot_with(1, keys=np.ones((4, 8), np.float32)))
    loaded = store.load("acme", "cats")
    assert loaded is not None
    with pytest.raises(ValueError, match="read-only"):
        loaded.arrays["keys"][0, 0] = 2.0


def test_migrations_run_once_even_when_replicas_start_together(postgres_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []

    def start() -> None:
        try:
            stores.append(PostgresStore(postgres_url))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for opened in stores:
        opened.close()
    assert errors == []
    assert rows(postgres_url, "SELECT version FROM shotcache_migrations ORDER BY version") == [
        (n,) for n in range(1, LATEST + 1)
    ]


def test_tasks_stored_before_the_incarnation_migration_load_and_update(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.save(make_snapshot(1))
    store.close()
    # The database as a shotcache before migration 3 left it: no incarnation column at all.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE shotcache_task DROP COLUMN incarnation")
        conn.execute("DELETE FROM shotcache_migrations WHERE version = 3")
    store = PostgresStore(postgres_url)  # migrates again: the old row gets a NULL incarnation
    try:
        assert_identical(store.load("acme", "cats"), make_snapshot(1))
        store.save(make_snapshot(2))  # its updates carry none, as before
        assert_identical(store.load("acme", "cats"), make_snapshot(2))
        with pytest.raises(VersionConflict, match="deleted and created again"):
            store.save(make_snapshot(3, incarnation="another"))
    finally:
        store.close()


def test_a_database_migrated_by_a_newer_shotcache_is_refused(postgres_url: str) -> None:
    PostgresStore(postgres_url).close()
    rows(postgres_url, "INSERT INTO shotcache_migrations (version, name) VALUES (999, 'future') RETURNING 1")
    with pytest.raises(SchemaTooNewError, match="migration 999, this shotcache knows up to"):
        PostgresStore(postgres_url)


def test_the_password_never_appears_in_errors_logs_or_descriptions(caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cr@t-pw"
    url = f"postgresql://bob:{password.replace('@', '%40')}@127.0.0.1:1/tasks?connect_timeout=2"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreUnavailable) as raised:
        PostgresStore(url)
    assert "unreachable" in str(raised.value)
    settings = Settings(store=url)
    with pytest.raises(ValueError, match="not a valid libpq URL") as invalid:
        open_store(Settings(store=f"postgresql://bob:{password}@db/tasks?no_such_option=1"))
    for text in (str(raised.value), str(invalid.value), caplog.text, repr(settings), describe_url(url)):
        assert password not in text
        assert "s3cr%40t" not in text
    assert describe_url(url) == "postgresql://bob@127.0.0.1:1/tasks"


def test_the_factory_picks_the_store_from_the_setting(tmp_path: Path, postgres_url: str) -> None:
    local = open_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalDirStore)
    assert local.root == tmp_path / "tasks"
    shared = open_store(Settings(data_dir=tmp_path, store=postgres_url))
    try:
        assert isinstance(shared, PostgresStore)
        assert describe_store(shared).startswith("postgresql://postgres@/")
    finally:
        shared.close()
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        open_store(Settings(data_dir=tmp_path, store="mysql://db/tasks"))


def test_an_outage_raises_store_unavailable_and_the_store_recovers_by_itself(
    store: PostgresStore, postgres: PostgresServer
) -> None:
    store.save(snapshot_with(1, keys=np.ones(3)))
    postgres.pause()
    try:
        for call in (lambda: store.live_version("acme", "cats"), lambda: store.save(snapshot_with(2, keys=np.ones(3)))):
            with pytest.raises(StoreUnavailable, match="unavailable"):
                call()
    finally:
        postgres.resume()
    deadline = time.monotonic() + 30
    while True:  # the pool reconnects in the background; no call to the store object is needed for it
        try:
            assert store.live_version("acme", "cats") == 1
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the store did not recover within 30 s of the database"
    store.save(snapshot_with(2, keys=np.ones(3)))
    assert store.live_version("acme", "cats") == 2


def test_readiness_fails_fast_in_an_outage_and_the_first_call_after_it_cleared_succeeds(
    store: PostgresStore, postgres: PostgresServer
) -> None:
    store.save(snapshot_with(1, keys=np.ones(3)))
    assert store.outage is None
    store.ping(0.5)
    postgres.pause()
    try:
        with pytest.raises(StoreUnavailable, match="unavailable"):
            store.ping(0.5)  # no call noticed the outage yet: the ping's own bound, then the outage is marked
        assert "unavailable" in (store.outage or "")
        with pytest.raises(StoreUnavailable, match="unavailable"):
            store.ping(0.5)  # known now: at once
        # A long outage: the pool's own reconnection backs off (1, 2, 4 s ...) meanwhile.
        time.sleep(5)
    finally:
        postgres.resume()
    deadline = time.monotonic() + 30
    while store.outage is not None:
        assert time.monotonic() < deadline, "the store did not notice the database's return within 30 s"
        time.sleep(0.05)
    # Healthy means usable: the first calls get a connection within the store's 1 s pool timeout, not
    # after the old pool's next reconnection attempt.
    store.ping(0.5)
    assert store.live_version("acme", "cats") == 1
    store.save(snapshot_with(2, keys=np.ones(3)))


def test_the_default_service_does_not_import_the_postgres_driver() -> None:
    probe = (
        "import sys, api.main, app.service.factory, app.store.factory;"
        "print(sorted(m for m in sys.modules if m.startswith('psycopg')))"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("SHOTCACHE_STORE", None)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT_ROOT, env=env, check=True
    )
    assert result.stdout.strip() == "[]"
