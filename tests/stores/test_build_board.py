"""Background builds' progress boards: this process's memory (local store) and PostgreSQL's table
(every replica reads it). A build whose replica stopped reporting reads as failed, not building."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from app.store.builds import STALE_AFTER_S, BuildBoard, BuildRecord, MemoryBuildBoard, ProgressReporter
from app.store.postgres import PostgresStore

Age = Callable[[str, str, float], None]  # make a record look `seconds` old


@pytest.fixture(params=["memory", "postgres"])
def board(request: pytest.FixtureRequest) -> Iterator[tuple[BuildBoard, Age]]:
    if request.param == "memory":
        memory = MemoryBuildBoard()

        def age_memory(tenant: str, task_id: str, seconds: float) -> None:
            record = memory._records[(tenant, task_id)]
            memory._records[(tenant, task_id)] = BuildRecord(
                **{**record.__dict__, "heartbeat_at": record.heartbeat_at - seconds}
            )

        yield memory, age_memory
        return
    url = request.getfixturevalue("postgres_url")
    store = PostgresStore(url)

    def age_postgres(tenant: str, task_id: str, seconds: float) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "UPDATE shotcache_build SET heartbeat_at = now() - make_interval(secs => %s)"
                " WHERE tenant = %s AND task_id = %s",
                (seconds, tenant, task_id),
            )

    yield store.builds, age_postgres
    store.close()


def test_a_build_record_is_written_read_listed_and_removed(board: tuple[BuildBoard, Age]) -> None:
    builds, _ = board
    assert builds.get("acme", "t1") is None
    with ProgressReporter(builds, BuildRecord("acme", "t1", total=10)) as progress:
        progress(4, 10)
        progress(10, 10)  # the last step is always written
        seen = builds.get("acme", "t1")
        assert seen is not None
        assert (seen.state, seen.done, seen.total, seen.error) == ("building", 10, 10, None)
        progress.fail("no_images", "nothing decoded")
    failed = builds.get("acme", "t1")
    assert failed is not None
    assert (failed.state, failed.error) == ("failed", {"code": "no_images", "message": "nothing decoded"})
    builds.put(BuildRecord("acme", "t2", total=3))
    builds.put(BuildRecord("beta", "t3", total=3))
    assert [r.task_id for r in builds.list("acme")] == ["t1", "t2"]
    builds.remove("acme", "t1")
    assert builds.get("acme", "t1") is None
    assert [r.task_id for r in builds.list("beta")] == ["t3"]


def test_a_build_whose_replica_stopped_reporting_reads_as_lost(board: tuple[BuildBoard, Age]) -> None:
    builds, age = board
    builds.put(BuildRecord("acme", "t1", total=10, done=3))
    age("acme", "t1", STALE_AFTER_S / 2)
    assert builds.get("acme", "t1").state == "building"  # type: ignore[union-attr]
    age("acme", "t1", STALE_AFTER_S)
    lost = builds.get("acme", "t1")
    assert lost is not None
    assert lost.state == "failed"
    assert lost.error is not None
    assert lost.error["code"] == "build_lost"
    assert [r.state for r in builds.list("acme")] == ["failed"]


def test_the_heartbeat_keeps_a_quiet_build_alive(board: tuple[BuildBoard, Age]) -> None:
    builds, age = board
    with ProgressReporter(builds, BuildRecord("acme", "t1", total=10)):
        age("acme", "t1", STALE_AFTER_S + 1)  # as if no progress for a long while
        deadline = time.monotonic() + 10
        while builds.get("acme", "t1").state != "building":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the heartbeat did not refresh the record"
            time.sleep(0.1)
