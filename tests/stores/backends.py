"""The task-store backends the contract suite runs against, each with what a test needs to reach behind
the store: open another store object on the same storage, damage a stored version, list what is left,
and the code a child process runs to open the same store (the SIGKILL harness)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.store import LocalDirStore, TaskStore

Damage = Callable[[str, str, str], None]  # (kind, tenant, task id): break the stored live version


@dataclass
class Backend:
    name: str
    open: Callable[[], TaskStore]  # a new store object on the same storage: a restart, or another replica
    damage: Damage
    residue: Callable[[], list[str]]  # whatever is stored at all (empty: nothing was ever written)
    shared: bool  # may several store objects (replicas) write the same storage at once?
    # Anything stored for the task beyond its live version `version` (empty: exactly one version is left).
    beyond_live: Callable[[str, str, int], list[str]]
    child_open: str  # a Python expression opening this store in a child process, from `location`
    location: str
    # Wait until a killed writer's last statement has finished where it runs (a database server finishes
    # a COMMIT it had received after its client died): reads made before that could see the old live
    # version and then the new one's rows.
    settle: Callable[[], None] = lambda: None
    _opened: list[Any] = field(default_factory=list)


def local_backend(root: Path) -> Backend:
    def damage(kind: str, tenant: str, task_id: str) -> None:
        task_dir = root / tenant / task_id
        version_dir = next(p for p in task_dir.iterdir() if p.name.startswith("v"))
        keys = version_dir / "a0000.npy"
        if kind == "truncated":
            os.truncate(keys, 100)
        elif kind == "flipped":
            data = bytearray(keys.read_bytes())
            data[-7] ^= 0x01
            keys.write_bytes(bytes(data))
        elif kind == "missing":
            (version_dir / "a0001.npy").unlink()
        elif kind == "meta":
            data = bytearray((version_dir / "meta.json").read_bytes())
            data[-2] ^= 0x01
            (version_dir / "meta.json").write_bytes(bytes(data))
        else:
            raise AssertionError(kind)

    def residue() -> list[str]:
        # Files only: an emptied tenant directory holds no data.
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())

    def beyond_live(tenant: str, task_id: str, version: int) -> list[str]:
        return sorted(set(os.listdir(root / tenant / task_id)) - {"current.json", f"v{version}"})

    return Backend(
        "local",
        lambda: LocalDirStore(root),
        damage,
        residue,
        shared=False,
        beyond_live=beyond_live,
        child_open="LocalDirStore(Path(location))",
        location=str(root),
    )


def postgres_backend(url: str) -> Backend:
    import psycopg

    from app.store.postgres import PostgresStore

    def sql(statement: str, params: dict[str, object] | None = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(url, autocommit=True) as conn:
            # A superuser may switch off the foreign keys: how a broken disk or a careless operator would.
            conn.execute("SET session_replication_role = replica")
            cursor = conn.execute(statement.encode(), params)
            return cursor.fetchall() if cursor.description else []

    def damage(kind: str, tenant: str, task_id: str) -> None:
        # The blob of the live version's array number `position`, of this task only (other tasks may
        # hold a blob with the same content).
        blob_of = (
            "tenant = %(tenant)s AND task_id = %(task)s AND sha256 = (SELECT a.sha256 FROM shotcache_array a"
            " JOIN shotcache_task t USING (tenant, task_id, version)"
            " WHERE a.tenant = %(tenant)s AND a.task_id = %(task)s AND a.position = {})"
        )
        statements = {
            "truncated": f"UPDATE shotcache_blob SET data = substring(data from 1 for 100) WHERE {blob_of.format(0)}",
            "flipped": "UPDATE shotcache_blob SET data = set_byte(data, length(data) - 7,"
            f" get_byte(data, length(data) - 7) # 1) WHERE {blob_of.format(0)}",
            "missing": f"DELETE FROM shotcache_blob WHERE {blob_of.format(1)}",
            "meta": "UPDATE shotcache_version SET meta = '{\"version\": 666}'"
            " WHERE tenant = %(tenant)s AND task_id = %(task)s",
        }
        sql(statements[kind], {"tenant": tenant, "task": task_id})

    def residue() -> list[str]:
        tables = ("shotcache_task", "shotcache_version", "shotcache_array", "shotcache_blob")
        try:
            return [f"{t}: {n}" for t in tables for (n,) in sql(f"SELECT count(*) FROM {t}") if n]
        except psycopg.errors.UndefinedTable:
            return []

    def beyond_live(tenant: str, task_id: str, version: int) -> list[str]:
        key = {"tenant": tenant, "task": task_id, "version": version}
        versions = sql(
            "SELECT version FROM shotcache_version WHERE tenant = %(tenant)s AND task_id = %(task)s"
            " AND version <> %(version)s",
            key,
        )
        unused = sql(
            "SELECT sha256 FROM shotcache_blob b WHERE tenant = %(tenant)s AND task_id = %(task)s AND NOT EXISTS"
            " (SELECT 1 FROM shotcache_array a WHERE a.tenant = b.tenant AND a.task_id = b.task_id"
            " AND a.sha256 = b.sha256 AND a.version = %(version)s)",
            key,
        )
        return [f"version {v}" for (v,) in versions] + [f"blob {digest}" for (digest,) in unused]

    def settle() -> None:
        deadline = time.monotonic() + 30
        busy = (
            "SELECT pid, state FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid() AND state IS DISTINCT FROM 'idle'"
        )
        while still := sql(busy):
            if time.monotonic() > deadline:
                raise AssertionError(f"sessions still busy 30 s after the kill: {still}")
            time.sleep(0.02)

    backend = Backend(
        "postgres",
        lambda: None,  # type: ignore[arg-type,return-value]
        damage,
        residue,
        shared=True,
        beyond_live=beyond_live,
        child_open="PostgresStore(location)",
        location=url,
        settle=settle,
    )

    def open_store() -> TaskStore:
        store = PostgresStore(url)
        backend._opened.append(store)
        return store

    backend.open = open_store
    return backend
