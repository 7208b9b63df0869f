"""The PostgreSQL store's connections: one pool, the outage mark that fails calls at once, the probe that
clears it, and the scrubbing that keeps the password out of every message.

Health is a state, not a round trip: while the database is known to be down, `outage` names the problem
and every call raises StoreUnavailable at once (a 503 in milliseconds, not after a pool timeout). An
outage is marked when a call cannot get a connection within its timeout; a probe thread then tries the
database every 0.5 s. When it answers, the probe opens a FRESH pool, waits for its first connection and
only then clears the mark: the old pool's own reconnection backs off exponentially (1, 2, 4, 8 s ...),
so after a long outage it could leave the first calls waiting seconds for a database that is back.

Readiness (`ping`) waits at most its own short timeout for a connection, so a probe during an outage
that no call has noticed yet answers within that bound and marks the outage for the calls after it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict

from app.store.base import StoreUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

CONNECT_TIMEOUT_S = 5
POOL_TIMEOUT_S = 5.0
PROBE_INTERVAL_S = 0.5
CONNECT_ARGS: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "shotcache"}
TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)


class ConnectionLost(StoreUnavailable):
    """A connection broke mid-call (not: no connection could be had); a read may retry on a new one."""


class Connections:
    """A pool of autocommit connections to `url` and the database's health as this process last saw it."""

    def __init__(self, url: str, *, max_connections: int, timeout_s: float) -> None:
        self.url = url
        self.description = describe_url(url)
        self._secrets = _secrets_of(url)
        self._max_connections = max(1, max_connections)
        self._timeout_s = timeout_s
        self._outage: str | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._pool = self._new_pool()

    def _new_pool(self) -> psycopg_pool.ConnectionPool[Connection]:
        return psycopg_pool.ConnectionPool(
            self.url,
            min_size=1,
            max_size=self._max_connections,
            kwargs={"autocommit": True, **CONNECT_ARGS},
            # A cheap round trip before a pooled connection is handed out: after a database restart the
            # pool replaces dead connections instead of failing the next requests with them.
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=self._timeout_s,
            name="shotcache-store",
            open=True,
        )

    @property
    def outage(self) -> str | None:
        """Why the database is known to be down right now (None: it is not); never does I/O."""
        return self._outage

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            pool = self._pool
        pool.close()

    @contextmanager
    def connection(self, timeout_s: float | None = None) -> Iterator[Connection]:
        """A pooled connection; StoreUnavailable at once during a known outage, after `timeout_s` (default:
        the pool's) when none can be had (which marks the outage), ConnectionLost if it broke mid-call."""
        outage = self._outage
        if outage is not None:
            raise StoreUnavailable(outage)
        try:
            with self._pool.connection(timeout=timeout_s) as conn:
                yield conn
        except psycopg_pool.PoolTimeout as error:
            raise StoreUnavailable(self._went_down(error)) from None
        except TRANSIENT as error:  # includes PoolClosed: a call that met the pool replaced at recovery
            raise ConnectionLost(f"task store {self.description} is unavailable: {self.scrub(error)}") from None

    def read(self, read: Callable[[Connection], T]) -> T:
        """Run an idempotent read; once more if its connection broke (the database restarted under it)."""
        try:
            with self.connection() as conn:
                return read(conn)
        except ConnectionLost:
            logger.info("task store connection lost during a read; retrying once")
            with self.connection() as conn:
                return read(conn)

    def ping(self, timeout_s: float) -> None:
        """One round trip, waiting at most about `timeout_s` for a connection; StoreUnavailable if none."""
        with self.connection(timeout_s) as conn:
            conn.execute("SELECT 1").fetchone()

    def scrub(self, error: BaseException) -> str:
        return _scrubbed(error, self._secrets)

    def _went_down(self, error: BaseException) -> str:
        """Record an outage and start probing for the database's return; the message to raise."""
        message = f"task store {self.description} is unavailable: {self.scrub(error)}"
        with self._lock:
            if self._outage is None and not self._closed.is_set():
                self._outage = message
                logger.error("%s; failing requests at once until it answers again", message)
                threading.Thread(target=self._probe, name="shotcache-store-probe", daemon=True).start()
        return message

    def _probe(self) -> None:
        while not self._closed.wait(PROBE_INTERVAL_S):
            try:
                with psycopg.connect(self.url, autocommit=True, **CONNECT_ARGS) as conn:
                    conn.execute("SELECT 1")
            except TRANSIENT:
                continue
            fresh = self._new_pool()
            try:
                fresh.wait(timeout=self._timeout_s)
            except psycopg_pool.PoolTimeout:
                fresh.close()
                continue
            with self._lock:
                if self._closed.is_set():
                    old = fresh
                else:
                    old, self._pool = self._pool, fresh
                    self._outage = None
            old.close(timeout=1.0)  # calls still holding its connections finish; they are closed on return
            logger.info("task store %s answers again", self.description)
            return


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


def scrub(error: BaseException, url: str) -> str:
    """The error's message on one line, without the password of `url` (or of libpq's environment)."""
    return _scrubbed(error, _secrets_of(url))


def _scrubbed(error: BaseException, secrets: list[str]) -> str:
    message = " ".join(str(error).split())
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


def _secrets_of(url: str) -> list[str]:
    """Strings that must never appear in a message: the password, raw and as the URL spells it."""
    secrets = {os.environ.get("PGPASSWORD", "")}
    with suppress(psycopg.ProgrammingError):
        secrets.add(str(conninfo_to_dict(url).get("password") or ""))
    secrets |= {quote(secret, safe="") for secret in secrets}
    return sorted((s for s in secrets if s), key=len, reverse=True)
