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

A snapshot of version 1 creates its task; a higher version updates one that exists and has the
snapshot's incarnation (the pointer row's `incarnation`, set at create; NULL for tasks created before
migration 3, whose updates carry None). A save of version v > 1 that finds no task (deleted while the
update was built from v - 1), or another incarnation of it (deleted and created again meanwhile), is
refused with VersionConflict(live=None): a late writer never brings a deleted task back, nor changes
the task created after it under the same id.

Connection problems raise StoreUnavailable with a message that never holds the password; reads are
retried once on a fresh connection (a database restart breaks every pooled connection), writes are
not (a write whose commit was cut off may or may not have happened: the caller decides). The pool,
the outage mark and its probe are in `postgres_connections.py`; arrays' bytes and their checks in
`postgres_arrays.py`; background builds' board in `postgres_builds.py`.
"""

from __future__ import annotations

import logging

import psycopg

from app.store.base import (
    DamagedTask,
    DamagedTaskError,
    StoreUnavailable,
    TaskSnapshot,
    TaskStore,
    VersionConflict,
    check_id,
    encode_meta,
    refusal,
)
from app.store.postgres_arrays import DamageError, StoredArray, sha256_of, verified_array, verified_meta
from app.store.postgres_builds import PostgresBuildBoard
from app.store.postgres_connections import (
    CONNECT_ARGS,
    POOL_TIMEOUT_S,
    TRANSIENT,
    Connection,
    Connections,
    describe_url,
    scrub,
)
from app.store.postgres_schema import migrate

__all__ = ["PostgresStore", "describe_url"]

logger = logging.getLogger(__name__)


class PostgresStore(TaskStore):
    """Tasks in a PostgreSQL database; see the module docstring for the transaction argument."""

    def __init__(self, url: str, *, max_connections: int = 8, timeout_s: float = POOL_TIMEOUT_S) -> None:
        """Connect, migrate the schema, open the pool; StoreUnavailable (at once) if the database is
        unreachable. `timeout_s` bounds how long a call waits for a connection before StoreUnavailable."""
        self.description = describe_url(url)
        self.shared = True  # every replica on this database sees every task: check versions per request
        try:
            with psycopg.connect(url, autocommit=True, **CONNECT_ARGS) as conn:
                applied = migrate(conn)
        except TRANSIENT as error:
            raise StoreUnavailable(f"task store {self.description} is unreachable: {scrub(error, url)}") from None
        if applied:
            logger.info("task store %s: applied schema migration(s) %s", self.description, applied)
        self._db = Connections(url, max_connections=max_connections, timeout_s=timeout_s)
        self.builds = PostgresBuildBoard(self._db)
        logger.info("task store: %s", self.description)

    @property
    def outage(self) -> str | None:
        """Why the database is known to be down (None: it is not known to be); never does I/O."""
        return self._db.outage

    def ping(self, timeout_s: float) -> None:
        """One round trip to the database within about `timeout_s`; StoreUnavailable if it does not answer
        (readiness). During a known outage it fails at once."""
        self._db.ping(timeout_s)

    def close(self) -> None:
        self._db.close()

    # --- TaskStore --------------------------------------------------------------------------------

    def save(self, snapshot: TaskSnapshot) -> None:
        meta = encode_meta(snapshot)
        arrays = [StoredArray.of(name, array) for name, array in snapshot.arrays.items()]
        key = (snapshot.tenant, snapshot.task_id)
        with self._db.connection() as conn, conn.transaction():
            if snapshot.version == 1:  # a new task: insert its pointer (a conflict if the id is taken)
                moved = conn.execute(
                    "INSERT INTO shotcache_task (tenant, task_id, version, incarnation) VALUES (%s, %s, 1, %s)"
                    " ON CONFLICT (tenant, task_id) DO NOTHING RETURNING version",
                    (*key, snapshot.incarnation),
                ).fetchone()
            else:  # an update: move the pointer of the same incarnation forward; a deleted task stays deleted
                moved = conn.execute(
                    "UPDATE shotcache_task SET version = %s, updated_at = now()"
                    " WHERE tenant = %s AND task_id = %s AND version < %s AND incarnation IS NOT DISTINCT FROM %s"
                    " RETURNING version",
                    (snapshot.version, *key, snapshot.version, snapshot.incarnation),
                ).fetchone()
            if moved is None:
                row = conn.execute(
                    "SELECT version, incarnation FROM shotcache_task WHERE tenant = %s AND task_id = %s", key
                ).fetchone()
                live = None if row is None else (int(row[0]), None if row[1] is None else str(row[1]))
                # None: the row changed between the statement and this read (a concurrent delete or create).
                raise refusal(snapshot, live) or VersionConflict(
                    f"task {snapshot.tenant}/{snapshot.task_id}: version {snapshot.version} refused, "
                    "the task changed while it was saved; retry",
                    live=None if live is None else live[0],
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
                    (*key, snapshot.version, meta.decode("utf-8"), sha256_of(meta)),
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

        return self._db.read(read)

    def live_head(self, tenant: str, task_id: str) -> tuple[int, str | None] | None:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))

        def read(conn: Connection) -> tuple[int, str | None] | None:
            row = conn.execute(
                "SELECT version, incarnation FROM shotcache_task WHERE tenant = %s AND task_id = %s", key
            ).fetchone()
            return None if row is None else (int(row[0]), None if row[1] is None else str(row[1]))

        return self._db.read(read)

    def load(self, tenant: str, task_id: str) -> TaskSnapshot | None:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))
        return self._db.read(lambda conn: self._load(conn, *key))

    def delete(self, tenant: str, task_id: str) -> bool:
        key = (check_id(tenant, "tenant"), check_id(task_id, "task id"))
        with self._db.connection() as conn, conn.transaction():
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
        return sorted(self._db.read(lambda conn: [(str(t), str(i)) for t, i in conn.execute(query, params)]))

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
        rows = self._db.read(
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
                "SELECT t.version, v.meta, v.meta_sha256, t.incarnation FROM shotcache_task t"
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
            meta = verified_meta(head[1], head[2], version)
            arrays = {str(row[0]): verified_array(*row) for row in rows}
            incarnation = None if head[3] is None else str(head[3])
            return TaskSnapshot(tenant, task_id, version, meta, arrays, incarnation)
        except (DamageError, ValueError) as error:
            location = f"{self.description} task {tenant}/{task_id} version {version}"
            raise DamagedTaskError(DamagedTask(tenant, task_id, location, str(error))) from None
