"""Where background builds (`wait=false`) report their progress, so any replica can answer the poll.

A build's record lives on a `BuildBoard`: the local store's board is this process's memory (one
process owns a local task directory, so only it can be polled); PostgreSQL's is a table every replica
reads (`PostgresBuildBoard` in postgres_builds.py). The replica running a build rewrites its record every `HEARTBEAT_S`
seconds (progress or not); a record still "building" whose heartbeat is older than `STALE_AFTER_S`
belongs to a replica that died mid-build, and reads as failed (`build_lost`) rather than forever
building.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0

logger = logging.getLogger(__name__)

BuildState = Literal["building", "failed"]


@dataclass(frozen=True)
class BuildRecord:
    tenant: str
    task_id: str
    total: int
    done: int = 0
    state: BuildState = "building"
    error: dict[str, Any] | None = None  # {"code", "message"} once failed
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)

    def as_seen(self, now: float | None = None) -> BuildRecord:
        """The record as a poller should see it: a silent builder's record is a lost build."""
        now = time.time() if now is None else now
        if self.state == "building" and now - self.heartbeat_at > STALE_AFTER_S:
            message = f"the replica building this task stopped reporting {now - self.heartbeat_at:.0f} s ago"
            return replace(self, state="failed", error={"code": "build_lost", "message": message})
        return self


class BuildBoard(Protocol):
    def put(self, record: BuildRecord) -> None:
        """Create or replace the record of (record.tenant, record.task_id)."""
        ...

    def get(self, tenant: str, task_id: str) -> BuildRecord | None: ...

    def list(self, tenant: str) -> list[BuildRecord]: ...

    def remove(self, tenant: str, task_id: str) -> None: ...


class MemoryBuildBoard(BuildBoard):
    """This process's builds (the local store's board)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], BuildRecord] = {}

    def put(self, record: BuildRecord) -> None:
        with self._lock:
            self._records[(record.tenant, record.task_id)] = record

    def get(self, tenant: str, task_id: str) -> BuildRecord | None:
        with self._lock:
            record = self._records.get((tenant, task_id))
        return None if record is None else record.as_seen()

    def list(self, tenant: str) -> list[BuildRecord]:
        with self._lock:
            records = [r for (t, _), r in self._records.items() if t == tenant]
        return sorted((r.as_seen() for r in records), key=lambda r: r.started_at)

    def remove(self, tenant: str, task_id: str) -> None:
        with self._lock:
            self._records.pop((tenant, task_id), None)


class ProgressReporter:
    """Keeps a build's record on its board current while the build runs (a context manager).

    Progress is written at most every HEARTBEAT_S (and always the last step); a heartbeat thread
    rewrites the record every HEARTBEAT_S while no progress comes (tuning, saving), so only a builder
    that really stopped goes stale.
    """

    def __init__(self, board: BuildBoard, record: BuildRecord) -> None:
        self._board = board
        self._record = record
        self._lock = threading.Lock()
        self._written_at = 0.0
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="shotcache-build-heartbeat", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._write()
        self._heartbeat.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._heartbeat.join()

    def __call__(self, done: int, total: int) -> None:
        with self._lock:
            self._record = replace(self._record, done=done, total=total)
            due = done >= total or time.time() - self._written_at >= HEARTBEAT_S
        if due:
            self._write()

    def fail(self, code: str, message: str, **details: Any) -> None:
        with self._lock:
            error = {"code": code, "message": message, **details}
            self._record = replace(self._record, state="failed", error=error)
        self._write()

    def _write(self) -> None:
        with self._lock:
            self._record = replace(self._record, heartbeat_at=time.time())
            self._written_at = self._record.heartbeat_at
            record = self._record
        try:
            self._board.put(record)
        except Exception:  # progress is advisory: a store hiccup must not fail the build
            logger.warning("could not record the progress of build %s/%s", record.tenant, record.task_id)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()
