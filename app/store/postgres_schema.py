"""The PostgreSQL store's schema, as numbered migrations applied once each at startup (no ORM).

Tables (every key starts with the tenant, so one tenant's rows can never answer another's lookup):

    shotcache_migrations  (version)                          which migrations this database has had
    shotcache_task        (tenant, task_id)                  the pointer: the task's live version and its
                                                             incarnation (NULL for tasks created before
                                                             migration 3)
    shotcache_version     (tenant, task_id, version)         an immutable version: its meta JSON + sha256
    shotcache_array       (tenant, task_id, version, position)   one array of a version: name, dtype,
                                                             shape, byte count and the sha256 of its bytes
    shotcache_blob        (tenant, task_id, sha256)          the bytes, content-addressed within a task
    shotcache_build       (tenant, task_id)                  a background build's progress (app/store/builds.py)

The blob table is the one part an object store could take over: a blob's key is
`<tenant>/<task_id>/<sha256>` (see `blob_key`) and every array row carries the sha256 that a load
verifies. Blobs are shared between versions of one task when an array did not change.

The pointer references its version and every array its blob through DEFERRABLE foreign keys, checked at
commit, so a save can move the pointer first (taking the row lock that serialises writers of the task)
and insert the version behind it in the same transaction.

A migration is appended, never edited: a database that has run migration N will not run it again.
Replicas starting together serialise on an advisory lock, so exactly one of them applies each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "task pointers, immutable versions, content-addressed blobs",
        """
        CREATE TABLE shotcache_version (
            tenant      text        NOT NULL,
            task_id     text        NOT NULL,
            version     integer     NOT NULL CHECK (version >= 1),
            meta        text        NOT NULL,
            meta_sha256 text        NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, task_id, version)
        );
        CREATE TABLE shotcache_task (
            tenant     text        NOT NULL,
            task_id    text        NOT NULL,
            version    integer     NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, task_id),
            FOREIGN KEY (tenant, task_id, version) REFERENCES shotcache_version
                DEFERRABLE INITIALLY DEFERRED
        );
        CREATE TABLE shotcache_blob (
            tenant  text   NOT NULL,
            task_id text   NOT NULL,
            sha256  text   NOT NULL,
            nbytes  bigint NOT NULL,
            data    bytea  NOT NULL,
            PRIMARY KEY (tenant, task_id, sha256)
        );
        -- Arrays are stored as they are, never compressed by PostgreSQL (float features do not shrink).
        ALTER TABLE shotcache_blob ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE TABLE shotcache_array (
            tenant   text     NOT NULL,
            task_id  text     NOT NULL,
            version  integer  NOT NULL,
            position integer  NOT NULL,
            name     text     NOT NULL,
            dtype    text     NOT NULL,
            shape    bigint[] NOT NULL,
            nbytes   bigint   NOT NULL,
            sha256   text     NOT NULL,
            PRIMARY KEY (tenant, task_id, version, position),
            UNIQUE (tenant, task_id, version, name),
            FOREIGN KEY (tenant, task_id, version) REFERENCES shotcache_version ON DELETE CASCADE,
            FOREIGN KEY (tenant, task_id, sha256) REFERENCES shotcache_blob DEFERRABLE INITIALLY DEFERRED
        );
        CREATE INDEX shotcache_array_blob ON shotcache_array (tenant, task_id, sha256);
        """,
    ),
    Migration(
        2,
        "background builds' progress, readable by every replica",
        """
        CREATE TABLE shotcache_build (
            tenant       text             NOT NULL,
            task_id      text             NOT NULL,
            total        integer          NOT NULL,
            done         integer          NOT NULL,
            state        text             NOT NULL CHECK (state IN ('building', 'failed')),
            error        jsonb,
            started_at   double precision NOT NULL,
            heartbeat_at timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, task_id)
        );
        """,
    ),
    Migration(
        3,
        "task incarnations: an update built before a delete and re-create does not change the new task",
        # Nullable, no default: existing rows (and their updates, which carry no incarnation) keep working.
        "ALTER TABLE shotcache_task ADD COLUMN incarnation text;",
    ),
)

LATEST = MIGRATIONS[-1].version
# Any constant works; it only has to be the same for every replica (pg_advisory_xact_lock takes a bigint).
_MIGRATION_LOCK = 0x5C0C_AC4E


class SchemaTooNewError(RuntimeError):
    """The database was migrated by a newer shotcache than this one."""


def blob_key(tenant: str, task_id: str, sha256: str) -> str:
    """The object-store key a blob would have outside the database (ids are checked: no '/' in them)."""
    return f"{tenant}/{task_id}/{sha256}"


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Bring the schema up to `LATEST` in one transaction; return the migrations applied now."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS shotcache_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {int(str(row[0])) for row in conn.execute("SELECT version FROM shotcache_migrations")}
        unknown = sorted(done - {m.version for m in MIGRATIONS})
        if unknown:
            raise SchemaTooNewError(
                f"the database has schema migration {unknown[-1]}, this shotcache knows up to {LATEST}: "
                "upgrade shotcache (or point SHOTCACHE_STORE at another database)"
            )
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            conn.execute(migration.sql.encode())  # bytes: a multi-statement script, sent without parameters
            conn.execute(
                "INSERT INTO shotcache_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied.append(migration.version)
    return applied
