"""Background builds (`wait=false`) as the task registry tracks them: this process's builds in memory and,
with a shared store, on its build board, so a poll that reaches another replica finds them (progress
published at most every 1 s, start and end at once). A mixin of `TaskRegistry`, under its one lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

from app.errors import AppError, ErrorCode
from app.store.builds import BuildBoard, BuildRecord, BuildState

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass(frozen=True)
class BuildStatus:
    """A task being built in the background (`wait=false`); replaced, never mutated."""

    tenant: str
    task_id: str
    total: int
    done: int = 0
    state: str = "building"  # building | failed
    error_code: ErrorCode | None = None
    error_message: str | None = None
    started_at: float = 0.0


def _status_of(record: BuildRecord) -> BuildStatus:
    """Another replica's build, as this registry reports builds."""
    code = None
    if record.error is not None:
        try:
            code = ErrorCode(str(record.error.get("code")))
        except ValueError:
            code = ErrorCode.INTERNAL_ERROR
    message = None if record.error is None else str(record.error.get("message"))
    if code is None and record.state == "failed":
        code = ErrorCode.INTERNAL_ERROR
    return BuildStatus(
        record.tenant, record.task_id, record.total, record.done, record.state, code, message, record.started_at
    )


class BuildTracking:
    """The registry's background builds; `TaskRegistry` sets these attributes and holds `_lock` around
    every access to `_builds`."""

    _lock: threading.Lock
    _builds: dict[Key, BuildStatus]
    build_board: BuildBoard | None
    _published: dict[Key, float]

    # This process's builds are in `_builds`; with a shared `build_board` (PostgreSQL) they are also
    # written there, so a poll that reaches another replica finds them (progress at most every 1 s).
    def build_status(self, key: Key) -> BuildStatus | None:
        with self._lock:
            status = self._builds.get(key)
        if status is None and self.build_board is not None:
            record = self.build_board.get(*key)
            status = None if record is None else _status_of(record)
        return status

    def builds(self, tenant: str) -> list[BuildStatus]:
        with self._lock:
            mine = {task_id: b for (owner, task_id), b in self._builds.items() if owner == tenant}
        if self.build_board is not None:
            for record in self.build_board.list(tenant):
                mine.setdefault(record.task_id, _status_of(record))
        return list(mine.values())

    def start_build(self, status: BuildStatus) -> None:
        with self._lock:
            self._builds[(status.tenant, status.task_id)] = status
        self._publish_build(status, force=True)

    def build_progress(self, key: Key, done: int) -> None:
        with self._lock:
            status = self._builds.get(key)
            if status is not None:
                status = self._builds[key] = replace(status, done=done)
        if status is not None:
            self._publish_build(status, force=done >= status.total)

    def end_build(self, key: Key, error: AppError | None) -> None:
        """A background build finished: forget it (its task is saved), or keep it as failed."""
        with self._lock:
            status = self._builds.pop(key, None)
            if status is not None and error is not None:
                status = self._builds[key] = replace(
                    status, state="failed", error_code=error.code, error_message=error.message
                )
        if self.build_board is not None and status is not None:
            if error is None:
                self.build_board.remove(*key)
            else:
                self._publish_build(status, force=True)

    def _publish_build(self, status: BuildStatus, *, force: bool) -> None:
        if self.build_board is None:
            return
        now = time.monotonic()
        key = (status.tenant, status.task_id)
        if not force and now - self._published.get(key, 0.0) < 1.0:
            return
        self._published[key] = now
        error = None if status.error_code is None else {"code": status.error_code, "message": status.error_message}
        state: BuildState = "failed" if status.state == "failed" else "building"
        try:
            self.build_board.put(
                BuildRecord(status.tenant, status.task_id, status.total, status.done, state, error, status.started_at)
            )
        except Exception:  # progress is advisory: a store hiccup must not fail the build
            log.warning("could not publish the progress of build %s/%s", *key)
