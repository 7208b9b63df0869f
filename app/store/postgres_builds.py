"""Background builds' progress in PostgreSQL (`shotcache_build`), so a poll on any replica finds it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg.types.json

from app.store.base import check_id
from app.store.builds import BuildBoard, BuildRecord
from app.store.postgres_connections import Connections


class PostgresBuildBoard(BuildBoard):
    """Background builds' progress in `shotcache_build`, on the database's clock (replicas' may differ)."""

    _COLUMNS = "tenant, task_id, total, done, state, error, started_at, extract(epoch FROM heartbeat_at), " + (
        "extract(epoch FROM now())"
    )

    def __init__(self, db: Connections) -> None:
        self._db = db

    def put(self, record: BuildRecord) -> None:
        with self._db.connection() as conn:
            conn.execute(
                "INSERT INTO shotcache_build (tenant, task_id, total, done, state, error, started_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, task_id) DO UPDATE SET"
                " total = EXCLUDED.total, done = EXCLUDED.done, state = EXCLUDED.state, error = EXCLUDED.error,"
                " heartbeat_at = now()",
                (
                    check_id(record.tenant, "tenant"),
                    check_id(record.task_id, "task id"),
                    record.total,
                    record.done,
                    record.state,
                    psycopg.types.json.Jsonb(record.error) if record.error is not None else None,
                    record.started_at,
                ),
            )

    def get(self, tenant: str, task_id: str) -> BuildRecord | None:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))
        query = f"SELECT {self._COLUMNS} FROM shotcache_build WHERE tenant = %s AND task_id = %s"
        row = self._db.read(lambda conn: conn.execute(query.encode(), key).fetchone())
        return None if row is None else _build_record(row)

    def list(self, tenant: str) -> list[BuildRecord]:
        query = f"SELECT {self._COLUMNS} FROM shotcache_build WHERE tenant = %s ORDER BY started_at"
        rows = self._db.read(lambda conn: conn.execute(query.encode(), (check_id(tenant, "tenant"),)).fetchall())
        return [_build_record(row) for row in rows]

    def remove(self, tenant: str, task_id: str) -> None:
        with self._db.connection() as conn:
            conn.execute(
                "DELETE FROM shotcache_build WHERE tenant = %s AND task_id = %s",
                (check_id(tenant, "tenant"), check_id(task_id, "task id")),
            )


def _build_record(row: Sequence[Any]) -> BuildRecord:
    tenant, task_id, total, done, state, error, started_at, heartbeat_at, now = row
    record = BuildRecord(
        str(tenant),
        str(task_id),
        int(total),
        int(done),
        state,
        error,
        float(started_at),
        float(heartbeat_at),
    )
    return record.as_seen(now=float(now))
