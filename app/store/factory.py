"""Settings -> the task store: the local directory by default, PostgreSQL for a `postgresql://` URL.

psycopg is imported only when a PostgreSQL store is asked for (extra `postgres`), so the default service
does not need it installed.
"""

from __future__ import annotations

from app.settings import Settings
from app.store.base import TaskStore
from app.store.builds import BuildBoard, MemoryBuildBoard
from app.store.local import LocalDirStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(settings: Settings) -> TaskStore:
    """The store `SHOTCACHE_STORE` names; ValueError (never echoing the URL) if it names none."""
    if settings.store is None:
        return LocalDirStore(settings.data_dir / "tasks")
    url = settings.store.get_secret_value()
    if not url.startswith(POSTGRES_SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else "(no scheme)"
        raise ValueError(
            f"SHOTCACHE_STORE must be a postgresql:// URL (or unset for the local directory), got {scheme!r}"
        )
    try:
        from psycopg.conninfo import conninfo_to_dict

        from app.store.postgres import PostgresStore
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise ValueError(
            f"SHOTCACHE_STORE is a PostgreSQL URL but psycopg is not installed ({error}): "
            "pip install 'shotcache[postgres]'"
        ) from None
    try:
        conninfo_to_dict(url)
    except Exception:  # psycopg's message may quote the URL, password included
        raise ValueError("SHOTCACHE_STORE is not a valid libpq URL (postgresql://user@host:port/db?...)") from None
    return PostgresStore(url, max_connections=settings.workers * 2 + 2)


def describe_store(store: TaskStore) -> str:
    """Where tasks live, for logs and /v1/info (never a password)."""
    description = getattr(store, "description", None)
    if isinstance(description, str):
        return description
    if isinstance(store, LocalDirStore):
        return "local directory"
    return type(store).__name__


def build_board(store: TaskStore) -> BuildBoard:
    """Where background builds report progress: the store's own board if it is shared, else memory."""
    board = getattr(store, "builds", None)
    return board if board is not None else MemoryBuildBoard()


def outage(store: TaskStore) -> str | None:
    """Why a shared store is known to be down right now (None: it is not known to be); never does I/O."""
    known = getattr(store, "outage", None)
    return known if isinstance(known, str) else None


def ping(store: TaskStore, timeout_s: float) -> None:
    """StoreUnavailable if a shared store does not answer within about `timeout_s` (a local directory
    always does)."""
    check = getattr(store, "ping", None)
    if check is not None:
        check(timeout_s)
