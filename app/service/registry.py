"""The task registry: a cache of ready tasks over the `TaskStore`, which is the truth.

One lock guards every map here (tasks, tasks of other models, background builds, writer locks), and
no caller ever iterates them outside it: readers get immutable values (a frozen `Task`, a frozen
`BuildStatus`, a fresh list), so a reader sees one version of a task whole, old or new, never a mix.

- Reads: `get` serves the cached task; on a miss it loads the task from the store (load-on-miss).
  With `check_freshness`, every `get` first asks the store for the task's live version and incarnation
  (`store.live_head`, one cheap read) and reloads when either moved, so a replica sees what another
  replica wrote; off for the embedded local store, which only this process writes.
- Writes: one writer per task at a time (`writing(key)`: a per-task lock that exists only while someone
  holds or waits for it, so locks disappear with their task). `save` goes through the store's
  compare-and-set: a writer that built from a stale version gets `StaleVersion` (code
  `version_conflict`, carrying the live version) and the stale cached copy is dropped.
- Startup: `restore` loads every stored task (the local store's warm start).
- Background builds: `build_tracking.py` (`BuildTracking`, a mixin working under this lock).

Seam for a shared store and a memory budget (issue 12): give the registry any `TaskStore` (e.g. a
PostgreSQL one) and `check_freshness=True`; pass `budget_bytes` to bound the cached tasks' memory. The
cache is kept in least-recently-used order, and `_evict_over_budget` drops the oldest entries (a dropped
task is reloaded on its next `get`); override `_on_evict` to observe evictions. A task's size is what it
holds (`Task.nbytes`), counted again whenever a method's first use fits it (`_resized`), so a method fitted
late counts against the budget like one fitted at load. Listing: with a budget
or freshness checks the cache is not the whole truth, so `list` asks the store for the ids.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.errors import AppError, ErrorCode, StaleVersion
from app.heap import release_freed_memory
from app.store import DamagedTask, DamagedTaskError, TaskSnapshot, TaskStore, VersionConflict
from app.store.base import check_id
from app.store.builds import BuildBoard

from . import metrics
from .build_tracking import BuildStatus, BuildTracking, Key
from .task import Task

__all__ = ["BuildStatus", "Key", "TaskRegistry"]

log = logging.getLogger(__name__)


@dataclass
class _WriterLock:
    lock: threading.Lock
    users: int = 0


class TaskRegistry(BuildTracking):
    def __init__(
        self,
        store: TaskStore,
        load: Callable[[TaskSnapshot], Task],
        dump: Callable[[Task], TaskSnapshot],
        *,
        model_id: str,
        check_freshness: bool = False,
        budget_bytes: int | None = None,
        build_board: BuildBoard | None = None,
    ) -> None:
        self.store = store
        self._load = load
        self._dump = dump
        self.model_id = model_id
        self.check_freshness = check_freshness
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._tasks: collections.OrderedDict[Key, Task] = collections.OrderedDict()  # LRU order
        self._bytes = 0
        self._sizes: dict[Key, int] = {}  # what each cached task counts in _bytes
        self._foreign: dict[Key, str] = {}  # tasks built with another model: their model id
        self._builds: dict[Key, BuildStatus] = {}
        self.build_board: BuildBoard | None = build_board
        self._published: dict[Key, float] = {}
        self._writers: dict[Key, _WriterLock] = {}
        self.damaged: list[DamagedTask] = []

    # ---- startup ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load every stored task; damaged ones are reported and skipped, never fatal."""
        snapshots, damaged = self.store.load_all()
        self.damaged = list(damaged)
        for item in damaged:
            log.error("damaged task %s/%s skipped (%s): %s", item.tenant, item.task_id, item.location, item.reason)
        for snapshot in snapshots:
            try:
                self._adopt(snapshot)
            except AppError:  # another model's task: recorded in _foreign, not served
                continue
            except (ValueError, KeyError, TypeError) as exc:
                self.damaged.append(DamagedTask(snapshot.tenant, snapshot.task_id, "store", f"unusable: {exc}"))
                log.error("task %s/%s could not be rebuilt, skipped: %s", snapshot.tenant, snapshot.task_id, exc)
        del snapshots
        release_freed_memory()  # the fits' temporaries, freed between the tasks' arrays (heap.py)
        log.info(
            "restored %d task(s); %d damaged, %d from other models",
            len(self._tasks),
            len(self.damaged),
            len(self._foreign),
        )

    # ---- reads --------------------------------------------------------------------------------
    def cached(self, key: Key) -> Task | None:
        """The cached task if it may be served without asking the store (never does I/O)."""
        if self.check_freshness:
            return None
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                self._tasks.move_to_end(key)
            return task

    def get(self, key: Key) -> Task:
        """The live task (may read the store: call it from a worker thread). Raises `AppError`:
        task_not_found, building, model_mismatch, task_damaged."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None:
                self._tasks.move_to_end(key)
        if task is not None and self.check_freshness:
            # The incarnation too: a task deleted and created again elsewhere may be at the cached version.
            live = self.store.live_head(*key)
            if live != (task.version, task.incarnation):
                self._forget(key, task.version)
                task = None
        if task is not None:
            return task
        self._raise_if_unservable(key)
        _check_key(key)
        try:
            snapshot = self.store.load(*key)
        except DamagedTaskError as exc:
            raise AppError(ErrorCode.TASK_DAMAGED, f"task {key[1]} is damaged on storage and cannot be served") from exc
        if snapshot is None:
            self._raise_if_unservable(key)  # a build may have started meanwhile
            raise AppError(ErrorCode.TASK_NOT_FOUND, f"task {key[1]} not found")
        try:
            return self._adopt(snapshot)
        except (ValueError, KeyError, TypeError) as exc:
            raise AppError(ErrorCode.TASK_DAMAGED, f"task {key[1]} is stored but unusable: {exc}") from None

    def list(self, tenant: str) -> list[Task]:
        """The tenant's ready tasks, oldest first (store I/O when the cache may be partial)."""
        if self.check_freshness or self.budget_bytes is not None:
            tasks = []
            for _, task_id in self.store.list_ids(tenant):
                try:
                    tasks.append(self.get((tenant, task_id)))
                except AppError:  # deleted meanwhile, another model's, damaged: not listed
                    continue
        else:
            with self._lock:
                tasks = [t for (owner, _), t in self._tasks.items() if owner == tenant]
        return sorted(tasks, key=lambda t: t.created_at)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tasks)

    # ---- writes -------------------------------------------------------------------------------
    @contextmanager
    def writing(self, key: Key) -> Iterator[None]:
        """Hold the task's writer lock (one create / add-shots / delete per task at a time)."""
        with self._lock:
            writer = self._writers.setdefault(key, _WriterLock(threading.Lock()))
            writer.users += 1
        try:
            with writer.lock:
                yield
        finally:
            with self._lock:
                writer.users -= 1
                if writer.users == 0:
                    del self._writers[key]

    def save(self, task: Task) -> None:
        """Durable first (the store's compare-and-set), then served: acknowledged only once stored."""
        try:
            self.store.save(self._dump(task))
        except VersionConflict as exc:
            self._forget(task.key, None)
            if exc.live is None:  # deleted while this change was built: the change must not recreate it
                raise AppError(
                    ErrorCode.TASK_NOT_FOUND,
                    f"task {task.task_id} was deleted while this change was built from version {task.version - 1}",
                ) from None
            raise StaleVersion(
                f"task {task.task_id} changed while this write was built from version {task.version - 1} "
                f"(live version: {exc.live}); retry",
                live=exc.live,
            ) from None
        self._put(task)

    def delete(self, key: Key) -> None:
        """Remove a task from the store, then from memory. Raises task_not_found, building."""
        with self._lock:
            build = self._builds.get(key)
            known = key in self._tasks or key in self._foreign or build is not None
        if build is not None and build.state == "building":
            raise AppError(ErrorCode.BUILDING, f"task {key[1]} is still building; delete it when it is ready")
        _check_key(key)
        existed = self.store.delete(*key)  # durable before we forget it
        if not existed and not known:
            raise AppError(ErrorCode.TASK_NOT_FOUND, f"task {key[1]} not found")
        with self._lock:
            self._drop(key)
            self._foreign.pop(key, None)
            self._builds.pop(key, None)

    def evict(self, key: Key) -> None:
        """Drop the cached copy only (the store keeps the task; the next `get` reloads it)."""
        with self._lock:
            self._drop(key)

    # ---- internals ----------------------------------------------------------------------------
    def _raise_if_unservable(self, key: Key) -> None:
        with self._lock:
            foreign = self._foreign.get(key)
            build = self._builds.get(key)
        if foreign is not None:
            raise AppError(
                ErrorCode.MODEL_MISMATCH,
                f"task {key[1]} was built with model {foreign}; this server runs {self.model_id}. "
                "Serve it with that model or rebuild it.",
            )
        if build is not None and build.state == "building":
            raise AppError(ErrorCode.BUILDING, f"task {key[1]} is still building ({build.done}/{build.total} images)")

    def _adopt(self, snapshot: TaskSnapshot) -> Task:
        key = (snapshot.tenant, snapshot.task_id)
        stored_model = str(snapshot.meta.get("model_id"))
        if stored_model != self.model_id:
            with self._lock:
                self._foreign[key] = stored_model
            log.warning("task %s/%s was built with %s, not %s: kept, not served", *key, stored_model, self.model_id)
            self._raise_if_unservable(key)
        task = self._load(snapshot)
        return self._put(task)

    def _put(self, task: Task) -> Task:
        """Cache `task` unless a newer version is cached already; returns the cached one."""
        with self._lock:
            current = self._tasks.get(task.key)
            if current is not None and current.version > task.version:
                return current
            self._drop(task.key)
            self._tasks[task.key] = task
            self._sizes[task.key] = size = task.nbytes
            self._bytes += size
            task.fitted.on_resize = lambda: self._resized(task)
            self._evict_over_budget(keep=task.key)
            metrics.TASKS_STORED.set(len(self._tasks))
            return task

    def _resized(self, task: Task) -> None:
        """A cached task fitted another method: count its new size, evict others if over budget."""
        with self._lock:
            if self._tasks.get(task.key) is not task:  # evicted or replaced meanwhile: not counted
                return
            size = task.nbytes
            self._bytes += size - self._sizes[task.key]
            self._sizes[task.key] = size
            self._evict_over_budget(keep=task.key)

    @property
    def cached_bytes(self) -> int:
        """What the cached tasks hold, as the budget counts it."""
        with self._lock:
            return self._bytes

    def _forget(self, key: Key, version: int | None) -> None:
        """Drop the cached copy if it is still `version` (None: whatever is cached)."""
        with self._lock:
            current = self._tasks.get(key)
            if current is not None and (version is None or current.version == version):
                self._drop(key)

    def _drop(self, key: Key) -> None:  # holds self._lock
        task = self._tasks.pop(key, None)
        if task is not None:
            self._bytes -= self._sizes.pop(key)
            metrics.TASKS_STORED.set(len(self._tasks))

    def _evict_over_budget(self, *, keep: Key) -> None:  # holds self._lock
        if self.budget_bytes is None:
            return
        while self._bytes > self.budget_bytes and len(self._tasks) > 1:
            oldest = next(iter(self._tasks))
            if oldest == keep:
                self._tasks.move_to_end(oldest)
                oldest = next(iter(self._tasks))
            self._drop(oldest)
            self._on_evict(oldest)

    def _on_evict(self, key: Key) -> None:
        log.debug("task %s/%s evicted from memory (budget %s bytes)", *key, self.budget_bytes)


def _check_key(key: Key) -> None:
    """task_not_found for ids no store can hold (they come from the URL, checked before any store call)."""
    try:
        check_id(key[0], "tenant")
        check_id(key[1], "task id")
    except ValueError:
        raise AppError(ErrorCode.TASK_NOT_FOUND, f"task {key[1][:64]!r} not found") from None
