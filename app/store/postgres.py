"""The shared task store: PostgreSQL (psycopg 3), so every replica serves the same tasks.

Selected by `SHOTCACHE_STORE=postgresql://...` (any libpq URL, e.g. `postgresql:///shotcache?host=/run/pg`
for a unix socket; credentials from the URL or libpq's environment / ~/.pgpass). The schema and its
migrations are in `postgres_schema.py`.

Save is ONE transaction: move the task's pointer row to the new version with a conditional upsert
(`... ON CONFLICT DO UPDATE ... WHERE live < new`): that is the compare-and-set. It also takes the row
lock, so concurrent writers of one task queue behind it and then find their version stale
(VersionConflict naming the live version): never a lost update. Behind the pointer the transaction
inserts the version row, its array rows and the blobs the task does not have yet, and drops the
versions and blobs the new version no longer uses. Readers see the old or the new version, whole:
`load` reads pointer, version and arrays in one REPEATABLE READ snapshot.

Every array's bytes are checked against the length and sha256 in its row on load; a mismatch (or a
missing blob, or meta that fails its checksum) is a DamagedTaskError. A damaged task stays where it is
(other replicas may be serving an older cached copy); `load_all` reports it, `delete` removes it.

Connection problems raise StoreUnavailable with a message that never holds the password; reads are
retried once on a fresh connection (a database restart breaks every pooled connection), writes are
not (a write whose commit was cut off may or may not have happened: the caller decides). When no
connection can be had at all, the store marks itself down: calls fail at once (a 503 in
milliseconds, not after a pool timeout) while a probe thread retries the database every 0.5 s and
clears the mark when it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from math import prod
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import psycopg
import psycopg.types.json
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from app.store.base import (
    DamagedTask,
    DamagedTaskError,
    StoreUnavailable,
    TaskSnapshot,
    TaskStore,
    VersionConflict,
    check_id,
    encode_meta,
)
from app.store.builds import BuildBoard, BuildRecord
from app.store.postgres_schema import migrate

logger = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

_CONNECT_TIMEOUT_S = 5
_POOL_TIMEOUT_S = 5.0
_PROBE_INTERVAL_S = 0.5
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)


class _DamageError(Exception):
    """A stored version failed verification (internal: load raises DamagedTaskError)."""


class _ConnectionLost(StoreUnavailable):
    """A connection broke mid-call (not: no connection could be had); a read may retry on a new one."""


class PostgresStore(TaskStore):
    """Tasks in a PostgreSQL database; see the module docstring for the transaction argument."""

    def __init__(self, url: str, *, max_connections: int = 8, timeout_s: float = _POOL_TIMEOUT_S) -> None:
        """Connect, migrate the schema, open the pool; StoreUnavailable (at once) if the database is
        unreachable. `timeout_s` bounds how long a call waits for a connection before StoreUnavailable."""
        self._secrets = _secrets_of(url)
        self._url = url
        self.description = describe_url(url)
        self.shared = True  # every replica on this database sees every task: check versions per request
        self._outage: str | None = None  # set while the database is known down: calls fail at once
        self._outage_lock = threading.Lock()
        self._closed = threading.Event()
        connect_args: dict[str, Any] = {"connect_timeout": _CONNECT_TIMEOUT_S, "application_name": "shotcache"}
        try:
            with psycopg.connect(url, autocommit=True, **connect_args) as conn:
                applied = migrate(conn)
        except _TRANSIENT as error:
            raise StoreUnavailable(f"task store {self.description} is unreachable: {self._scrub(error)}") from None
        if applied:
            logger.info("task store %s: applied schema migration(s) %s", self.description, applied)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, max_connections),
            kwargs={"autocommit": True, **connect_args},
            # A cheap round trip before a pooled connection is handed out: after a database restart the
            # pool replaces dead connections instead of failing the next requests with them.
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=timeout_s,
            name="shotcache-store",
            open=True,
        )
        self.builds = PostgresBuildBoard(self)
        logger.info("task store: %s", self.description)

    def ping(self) -> None:
        """One round trip to the database; StoreUnavailable if it does not answer (readiness)."""
        self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> None:
        self._closed.set()
        self._pool.close()

    # --- TaskStore --------------------------------------------------------------------------------

    def save(self, snapshot: TaskSnapshot) -> None:
        meta = encode_meta(snapshot)
        arrays = [_StoredArray.of(name, array) for name, array in snapshot.arrays.items()]
        key = (snapshot.tenant, snapshot.task_id)
        with self._connection() as conn, conn.transaction():
            moved = conn.execute(
                "INSERT INTO shotcache_task (tenant, task_id, version) VALUES (%s, %s, %s)"
                " ON CONFLICT (tenant, task_id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()"
                " WHERE shotcache_task.version < EXCLUDED.version RETURNING version",
                (*key, snapshot.version),
            ).fetchone()
            if moved is None:
                live = conn.execute(
                    "SELECT version FROM shotcache_task WHERE tenant = %s AND task_id = %s", key
                ).fetchone()
                live_version = None if live is None else int(live[0])
                raise VersionConflict(
                    f"task {snapshot.tenant}/{snapshot.task_id}: version {snapshot.version} is not newer "
                    f"than the stored version {live_version}",
                    live=live_version,
                )
            conn.execute(
                "DELETE FROM shotcache_version WHERE tenant = %s AND task_id = %s AND version <> %s",
                (*key, snapshot.version),
            )
            stored = {
                str(row[0])
                for row in conn.execute("SELECT sha256 FROM shotcache_blob WHERE tenant = %s AND task_id = %s", key)
            }
            new_blobs = {a.sha256: a for a in arrays if a.sha256 not in stored}
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO shotcache_blob (tenant, task_id, sha256, nbytes, data) VALUES (%s, %s, %s, %s, %b)",
                    [(*key, a.sha256, a.nbytes, a.data) for a in new_blobs.values()],
                )
                cursor.execute(
                    "INSERT INTO shotcache_version (tenant, task_id, version, meta, meta_sha256)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (*key, snapshot.version, meta.decode("utf-8"), _sha256(meta)),
                )
                cursor.executemany(
                    "INSERT INTO shotcache_array"
                    " (tenant, task_id, version, position, name, dtype, shape, nbytes, sha256)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (*key, snapshot.version, position, a.name, a.dtype, list(a.shape), a.nbytes, a.sha256)
                        for position, a in enumerate(arrays)
                    ],
                )
            conn.execute(
                "DELETE FROM shotcache_blob WHERE tenant = %s AND task_id = %s AND NOT (sha256 = ANY(%s))",
                (*key, [a.sha256 for a in arrays]),
            )

    def live_version(self, tenant: str, task_id: str) -> int | None:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))

        def read(conn: Connection) -> int | None:
            row = conn.execute("SELECT version FROM shotcache_task WHERE tenant = %s AND task_id = %s", key).fetchone()
            return None if row is None else int(row[0])

        return self._read(read)

    def load(self, tenant: str, task_id: str) -> TaskSnapshot | None:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))
        return self._read(lambda conn: self._load(conn, *key))

    def delete(self, tenant: str, task_id: str) -> bool:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))
        with self._connection() as conn, conn.transaction():
            existed = conn.execute(
                "DELETE FROM shotcache_task WHERE tenant = %s AND task_id = %s RETURNING version", key
            ).fetchone()
            conn.execute("DELETE FROM shotcache_version WHERE tenant = %s AND task_id = %s", key)
            conn.execute("DELETE FROM shotcache_blob WHERE tenant = %s AND task_id = %s", key)
        return existed is not None

    def list_ids(self, tenant: str | None = None) -> list[tuple[str, str]]:
        params: tuple[str, ...] = ()
        if tenant is None:
            query = "SELECT tenant, task_id FROM shotcache_task ORDER BY tenant, task_id"
        else:
            query = "SELECT tenant, task_id FROM shotcache_task WHERE tenant = %s ORDER BY task_id"
            params = (check_id(tenant, "tenant"),)
        # Sorted in Python too: the database's collation need not order like str comparison does.
        return sorted(self._read(lambda conn: [(str(t), str(i)) for t, i in conn.execute(query, params)]))

    def load_all(self) -> tuple[list[TaskSnapshot], list[DamagedTask]]:
        snapshots: list[TaskSnapshot] = []
        damaged: list[DamagedTask] = []
        for tenant, task_id in self.list_ids():
            try:
                snapshot = self.load(tenant, task_id)
            except DamagedTaskError as error:
                logger.warning("task %s/%s is damaged (%s)", tenant, task_id, error.damaged.reason)
                damaged.append(error.damaged)
                continue
            if snapshot is not None:  # None: deleted since it was listed
                snapshots.append(snapshot)
        return snapshots, damaged

    def usage(self) -> dict[str, dict[str, int]]:
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT t.tenant, count(*), sum(octet_length(v.meta)"
                " + coalesce((SELECT sum(a.nbytes) FROM shotcache_array a WHERE a.tenant = t.tenant"
                " AND a.task_id = t.task_id AND a.version = t.version), 0))"
                " FROM shotcache_task t JOIN shotcache_version v USING (tenant, task_id, version)"
                " GROUP BY t.tenant"
            ).fetchall()
        )
        return {str(tenant): {"tasks": int(tasks), "bytes": int(size)} for tenant, tasks, size in rows}

    # --- reading ----------------------------------------------------------------------------------

    def _load(self, conn: Connection, tenant: str, task_id: str) -> TaskSnapshot | None:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            head = conn.execute(
                "SELECT t.version, v.meta, v.meta_sha256 FROM shotcache_task t"
                " LEFT JOIN shotcache_version v USING (tenant, task_id, version)"
                " WHERE t.tenant = %s AND t.task_id = %s",
                (tenant, task_id),
            ).fetchone()
            if head is None:
                return None
            version = int(head[0])
            with conn.cursor(binary=True) as cursor:  # binary: bytea arrives as bytes, not hex text
                rows = cursor.execute(
                    "SELECT a.name, a.dtype, a.shape, a.nbytes, a.sha256, b.data FROM shotcache_array a"
                    " LEFT JOIN shotcache_blob b USING (tenant, task_id, sha256)"
                    " WHERE a.tenant = %s AND a.task_id = %s AND a.version = %s ORDER BY a.position",
                    (tenant, task_id, version),
                ).fetchall()
        try:
            meta = _verified_meta(head[1], head[2], version)
            arrays = {str(row[0]): _verified_array(*row) for row in rows}
            return TaskSnapshot(tenant, task_id, version, meta, arrays)
        except (_DamageError, ValueError) as error:
            location = f"{self.description} task {tenant}/{task_id} version {version}"
            raise DamagedTaskError(DamagedTask(tenant, task_id, location, str(error))) from None

    # --- connections ------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        outage = self._outage
        if outage is not None:  # fail at once: a request must not wait out a pool timeout per call
            raise StoreUnavailable(outage)
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout as error:
            raise StoreUnavailable(self._went_down(error)) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _ConnectionLost(f"task store {self.description} is unavailable: {self._scrub(error)}") from None

    def _went_down(self, error: BaseException) -> str:
        """Record an outage and start probing for the database's return; the message to raise."""
        message = f"task store {self.description} is unavailable: {self._scrub(error)}"
        with self._outage_lock:
            if self._outage is None and not self._closed.is_set():
                self._outage = message
                logger.error("%s; failing requests at once until it answers again", message)
                threading.Thread(target=self._probe, name="shotcache-store-probe", daemon=True).start()
        return message

    def _probe(self) -> None:
        while not self._closed.wait(_PROBE_INTERVAL_S):
            try:
                with psycopg.connect(self._url, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True) as conn:
                    conn.execute("SELECT 1")
            except _TRANSIENT:
                continue
            self._pool.check()  # replace the pool's dead connections now, not on each one's next use
            with self._outage_lock:
                self._outage = None
            logger.info("task store %s answers again", self.description)
            return

    def _read(self, read: Callable[[Connection], T]) -> T:
        """Run an idempotent read; once more if its connection broke (the database restarted under it)."""
        try:
            with self._connection() as conn:
                return read(conn)
        except _ConnectionLost:
            logger.info("task store connection lost during a read; retrying once")
            with self._connection() as conn:
                return read(conn)

    def _scrub(self, error: BaseException) -> str:
        message = " ".join(str(error).split())
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


class PostgresBuildBoard(BuildBoard):
    """Background builds' progress in `shotcache_build`, on the database's clock (replicas' may differ)."""

    _COLUMNS = "tenant, task_id, total, done, state, error, started_at, extract(epoch FROM heartbeat_at), " + (
        "extract(epoch FROM now())"
    )

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def put(self, record: BuildRecord) -> None:
        with self._store._connection() as conn:
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
        row = self._store._read(lambda conn: conn.execute(query.encode(), key).fetchone())
        return None if row is None else _build_record(row)

    def list(self, tenant: str) -> list[BuildRecord]:
        query = f"SELECT {self._COLUMNS} FROM shotcache_build WHERE tenant = %s ORDER BY started_at"
        rows = self._store._read(lambda conn: conn.execute(query.encode(), (check_id(tenant, "tenant"),)).fetchall())
        return [_build_record(row) for row in rows]

    def remove(self, tenant: str, task_id: str) -> None:
        with self._store._connection() as conn:
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


class _StoredArray:
    """An array as the store writes it: C-order bytes, its numpy descr as JSON, length and sha256."""

    __slots__ = ("data", "dtype", "name", "nbytes", "sha256", "shape")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        self.name, self.dtype, self.shape, self.data = name, dtype, shape, data
        self.nbytes = data.nbytes
        self.sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def of(cls, name: str, array: npt.NDArray[Any]) -> _StoredArray:
        # descr (not dtype.str) so byte order and structured dtypes survive exactly, as in a .npy header.
        descr = json.dumps(np.lib.format.dtype_to_descr(array.dtype))
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # no copy unless not C-contiguous
        return cls(name, descr, tuple(int(n) for n in array.shape), flat.data)


def _verified_meta(meta: str | None, digest: str | None, version: int) -> dict[str, Any]:
    if meta is None or digest is None:
        raise _DamageError(f"the pointer names version {version}, which is missing")
    data = meta.encode("utf-8")
    if _sha256(data) != digest:
        raise _DamageError("checksum mismatch in meta")
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as error:
        raise _DamageError(f"meta is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise _DamageError("meta is not a JSON object")
    return parsed


def _verified_array(
    name: str, dtype: str, shape: Sequence[int], nbytes: int, digest: str, data: bytes | None
) -> npt.NDArray[Any]:
    if data is None:
        raise _DamageError(f"array {name!r}: its blob {digest[:12]}... is missing")
    if len(data) != nbytes:
        raise _DamageError(f"array {name!r} is {len(data)} bytes, its row says {nbytes}")
    if _sha256(data) != digest:
        raise _DamageError(f"checksum mismatch in array {name!r}")
    try:
        numpy_dtype = np.lib.format.descr_to_dtype(json.loads(dtype))
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise _DamageError(f"array {name!r} has an unreadable dtype {dtype!r}: {error}") from None
    if numpy_dtype.hasobject or numpy_dtype.itemsize * prod(shape) != nbytes:
        raise _DamageError(f"array {name!r}: dtype {numpy_dtype} and shape {tuple(shape)} do not make {nbytes} bytes")
    # Read-only, without a copy: a snapshot is immutable, and a 1000-class task's keys are 80 MB.
    return np.frombuffer(data, dtype=numpy_dtype).reshape(tuple(shape))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_url(url: str) -> str:
    """The store's URL for logs and /v1/info: user, host, port and database only, never the password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = params.get("user") or os.environ.get("PGUSER", "")
    host = params.get("host") or os.environ.get("PGHOST", "")
    port = params.get("port") or os.environ.get("PGPORT", "")
    dbname = params.get("dbname") or os.environ.get("PGDATABASE", "")
    netloc = f"{quote(str(user))}@" if user else ""
    netloc += str(host) + (f":{port}" if port else "")
    return f"postgresql://{netloc}/{dbname}"


def _secrets_of(url: str) -> list[str]:
    """Strings that must never appear in a message: the password, raw and as the URL spells it."""
    secrets = {os.environ.get("PGPASSWORD", "")}
    with suppress(psycopg.ProgrammingError):
        secrets.add(str(conninfo_to_dict(url).get("password") or ""))
    secrets |= {quote(secret, safe="") for secret in secrets}
    return sorted((s for s in secrets if s), key=len, reverse=True)
