"""The service core: tasks in memory and on disk, builds, classification.

The HTTP layer calls this and nothing deeper. Blocking methods (`create_task`, `add_shots`,
`delete_task`) run in the caller's worker thread; `classify` is async and awaits the encoder queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from app import __version__
from app.encoder import Encoder
from app.encoder.factory import ModelDefaults
from app.images import ImageLimits
from app.settings import Settings
from app.store import DamagedTask, DamagedTaskError, TaskStore, VersionConflict
from app.store.base import StoreUnavailable
from app.store.builds import BuildRecord, ProgressReporter
from app.store.factory import build_board, describe_store, ping
from cache_models import METHODS

from . import metrics
from .build import AUTO
from .builder import Progress, TaskBuilder
from .errors import Busy, Conflict, InvalidInput, NotFound, PayloadTooLarge, ServiceError
from .persist import from_snapshot, to_snapshot
from .queue import EncoderQueue
from .requests import (
    CreateTaskRequest,
    ShotsRequest,
    UploadedImage,
    check_class_specs,
    check_create,
    check_shots,
)
from .task import Prediction, Task

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class BuildStatus:
    """A task being built in the background (`wait=false`)."""

    tenant: str
    task_id: str
    total: int
    done: int = 0
    state: str = "building"  # building | failed
    error: dict[str, Any] | None = None
    error_status: int | None = None  # the HTTP status of the error a failed build ended with
    started_at: float = 0.0


def _status_of(record: BuildRecord) -> BuildStatus:
    error = dict(record.error) if record.error else None
    # A lost build (its replica died) is the service's trouble, not the request's: 503, retry.
    error_status = int(error.pop("status", 503 if error.get("code") == "build_lost" else 500)) if error else None
    return BuildStatus(
        record.tenant, record.task_id, record.total, record.done, record.state, error, error_status, record.started_at
    )


# What a loaded task holds in RAM, as a multiple of its shot features + class text (issue 11 measured
# ~26x with every method fitted; this is what the task cache budget counts, until the core records it).
_RESIDENT_FACTOR = 26


def _resident_bytes(task: Task) -> int:
    return _RESIDENT_FACTOR * (task.shot_features.nbytes + task.text.nbytes)


class TaskService:
    def __init__(self, settings: Settings, encoder: Encoder, store: TaskStore, *, fallback: str | None) -> None:
        self.settings = settings
        self.encoder = encoder
        self.store = store
        self.fallback_reason = fallback
        self.model_defaults = ModelDefaults.for_key(encoder.loaded.config_key)
        self.default_method = self.model_defaults.default_method
        self.limits = ImageLimits(
            max_file_bytes=int(settings.max_file_mb * 1024 * 1024),
            min_side=settings.min_image_side,
            max_side=settings.max_image_side,
            max_pixels=settings.max_image_pixels,
        )
        self.queue = EncoderQueue(
            encoder, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, capacity=settings.queue_size
        )
        # Decoding/preprocessing for classify and task builds get separate pools, so a long build can
        # never starve classify of threads; the encoder queue already puts classify first.
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="shotcache-cpu")
        self.build_executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="shotcache-build")
        self.builder = TaskBuilder(settings, encoder, self.queue, self.limits, self.default_method)
        # Loaded tasks, least recently used first, bounded by SHOTCACHE_TASK_CACHE_MB: the store is the
        # truth; a task not here is loaded from it on demand. With a shared store (PostgreSQL) every
        # request checks the live version there first (one indexed lookup), so an update acknowledged
        # by any replica is what the next request anywhere sees.
        self._tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()
        self._task_bytes: dict[tuple[str, str], int] = {}
        self._cache_budget = int(settings.task_cache_mb * 2**20)
        self.shared_store = bool(getattr(store, "shared", False))
        self.build_board = build_board(store)
        self._foreign: dict[tuple[str, str], str] = {}  # tasks built with another model: their model id
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._registry_lock = threading.Lock()
        self._pending_builds = 0  # creates / shot additions admitted and not finished (bounded: 429 past it)
        self.damaged: list[DamagedTask] = []
        self.ready = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.restore()
        self.queue.start()
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.queue.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.build_executor.shutdown(wait=True, cancel_futures=True)

    def restore(self) -> None:
        """Load every stored task; damaged ones are reported and skipped, never fatal. A shared store's
        tasks are loaded on demand instead (other replicas keep adding them)."""
        if self.shared_store:
            log.info("tasks are loaded from the shared store on demand")
            return
        snapshots, damaged = self.store.load_all()
        self.damaged = list(damaged)
        for item in damaged:
            log.error("damaged task %s/%s skipped (%s): %s", item.tenant, item.task_id, item.location, item.reason)
        model_id = self.encoder.identity.model_id
        for snapshot in snapshots:
            key = (snapshot.tenant, snapshot.task_id)
            stored_model = str(snapshot.meta.get("model_id"))
            if stored_model != model_id:
                self._foreign[key] = stored_model
                log.warning("task %s/%s was built with %s, not %s: kept, not served", *key, stored_model, model_id)
                continue
            try:
                self._cache(from_snapshot(snapshot))
            except (ValueError, KeyError, TypeError) as exc:
                self.damaged.append(DamagedTask(snapshot.tenant, snapshot.task_id, "store", f"unusable: {exc}"))
                log.error("task %s/%s could not be rebuilt, skipped: %s", *key, exc)
        metrics.TASKS_STORED.set(len(self._tasks))
        log.info(
            "restored %d task(s); %d damaged, %d from other models",
            len(self._tasks),
            len(self.damaged),
            len(self._foreign),
        )

    # ---- tasks --------------------------------------------------------------------------------
    def _lock_for(self, key: tuple[str, str]) -> threading.Lock:
        with self._registry_lock:
            return self._locks.setdefault(key, threading.Lock())

    def get_task(self, tenant: str, task_id: str) -> Task:
        key = (tenant, task_id)
        with self._registry_lock:
            task = self._tasks.get(key)
            if task is not None:
                self._tasks.move_to_end(key)
        if self.shared_store:
            live = self.store.live_version(tenant, task_id)  # StoreUnavailable: the API answers 503
            if live is None:
                self._forget(key)
                task = None
            elif task is not None and task.version != live:
                task = None  # another replica moved it on: reload
        if task is not None:
            return task
        if key in self._foreign:
            raise Conflict(
                f"task {task_id} was built with model {self._foreign[key]}; this server runs "
                f"{self.encoder.identity.model_id}. Serve it with that model or rebuild it.",
                code="model_mismatch",
            )
        build = self.build_board.get(tenant, task_id)
        if build is not None and build.state == "building":
            raise Conflict(f"task {task_id} is still building ({build.done}/{build.total} images)", code="building")
        loaded = self._load(tenant, task_id)
        if loaded is not None:
            return loaded
        raise NotFound(f"task {task_id} not found", code="task_not_found")

    def _load(self, tenant: str, task_id: str) -> Task | None:
        """The stored task, loaded into the cache; None if the store has none."""
        try:
            snapshot = self.store.load(tenant, task_id)
        except DamagedTaskError as error:
            log.error("task %s/%s is damaged: %s", tenant, task_id, error.damaged.reason)
            raise Conflict(
                f"task {task_id} is damaged in the store and cannot be served", code="task_damaged"
            ) from None
        if snapshot is None:
            return None
        stored_model = str(snapshot.meta.get("model_id"))
        if stored_model != self.encoder.identity.model_id:
            self._foreign[(tenant, task_id)] = stored_model
            return self.get_task(tenant, task_id)  # raises model_mismatch
        task = from_snapshot(snapshot)
        self._cache(task)
        return task

    def _cache(self, task: Task) -> None:
        """Keep `task` loaded (replacing an older version); unload the least recently used past the budget."""
        key = (task.tenant, task.task_id)
        with self._registry_lock:
            current = self._tasks.get(key)
            if current is not None and current.version > task.version:
                return  # a newer version got here first
            self._tasks[key] = task
            self._tasks.move_to_end(key)
            self._task_bytes[key] = _resident_bytes(task)
            while len(self._tasks) > 1 and sum(self._task_bytes.values()) > self._cache_budget:
                evicted, _ = self._tasks.popitem(last=False)
                self._task_bytes.pop(evicted, None)
            metrics.TASKS_STORED.set(len(self._tasks))

    def _forget(self, key: tuple[str, str]) -> None:
        with self._registry_lock:
            self._tasks.pop(key, None)
            self._task_bytes.pop(key, None)
            self._foreign.pop(key, None)
            metrics.TASKS_STORED.set(len(self._tasks))

    def store_problem(self) -> str | None:
        """Why the store cannot serve right now (None: it can); for /readyz."""
        try:
            ping(self.store)
        except StoreUnavailable as error:
            return str(error)
        return None

    def build_status(self, tenant: str, task_id: str) -> BuildStatus | None:
        record = self.build_board.get(tenant, task_id)
        return None if record is None else _status_of(record)

    def list_tasks(self, tenant: str) -> list[Task]:
        if not self.shared_store:
            with self._registry_lock:
                tasks = [t for (ten, _), t in self._tasks.items() if ten == tenant]
            return sorted(tasks, key=lambda t: t.created_at)
        tasks = []
        for _, task_id in self.store.list_ids(tenant):
            try:
                tasks.append(self.get_task(tenant, task_id))
            except (NotFound, Conflict):  # deleted meanwhile, another model's, damaged: not listed
                continue
        return sorted(tasks, key=lambda t: t.created_at)

    def builds(self, tenant: str) -> list[BuildStatus]:
        return [_status_of(r) for r in self.build_board.list(tenant)]

    def create_task(
        self,
        tenant: str,
        request: CreateTaskRequest,
        *,
        task_id: str | None = None,
        reporter: Progress | None = None,
    ) -> Task:
        """Decode, encode, tune and persist a new task; returns it once it is durable."""
        labels = check_create(request, self.settings)
        task_id = task_id or uuid.uuid4().hex
        started = time.monotonic()
        progress = self._progress_callback(tenant, task_id, len(request.images), reporter)
        task = self.builder.new_task(tenant, task_id, request, labels, progress)
        self._persist_and_publish(task)
        metrics.TASK_BUILD_SECONDS.observe(time.monotonic() - started)
        log.info(
            "task %s/%s created: %d shots, %d classes, method %s, %.1f s",
            tenant,
            task_id,
            len(request.images),
            len(task.classes),
            task.method,
            time.monotonic() - started,
        )
        return task

    # ---- admission of builds: uploads waiting to be built hold memory, so their number is bounded --
    def _admit_build(self) -> None:
        with self._registry_lock:
            if self._pending_builds >= self.settings.max_pending_builds:
                raise Busy(
                    f"{self._pending_builds} task builds are already running or waiting (limit "
                    f"{self.settings.max_pending_builds}); retry shortly",
                    retry_after=5.0,
                )
            self._pending_builds += 1

    def _release_build(self) -> None:
        with self._registry_lock:
            self._pending_builds -= 1

    async def run_build(self, build: Callable[..., T], *args: Any) -> T:
        """Run a blocking build (`create_task`, `add_shots`) on the build pool, or 429 if too many wait."""
        self._admit_build()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.build_executor, build, *args)
        finally:
            self._release_build()

    def start_create(self, tenant: str, request: CreateTaskRequest) -> BuildStatus:
        """Validate now, build in the background; progress via `build_status` (on any replica when the
        store is shared: the record lives on the store's build board)."""
        check_create(request, self.settings)
        self._admit_build()
        task_id = uuid.uuid4().hex
        record = BuildRecord(tenant, task_id, total=len(request.images), started_at=time.time())
        try:
            reporter = ProgressReporter(self.build_board, record).__enter__()
        except BaseException:
            self._release_build()
            raise

        def run() -> None:
            try:
                self.create_task(tenant, request, task_id=task_id, reporter=reporter)
                reporter.__exit__(None, None, None)
                self.build_board.remove(tenant, task_id)
            except ServiceError as exc:
                reporter.fail(exc.code, exc.message, status=exc.status)
                reporter.__exit__(None, None, None)
            except Exception as exc:  # reported through the status endpoint, and logged
                log.exception("background build of %s/%s failed", tenant, task_id)
                code = "store_unavailable" if isinstance(exc, StoreUnavailable) else "internal_error"
                reporter.fail(code, str(exc), status=503 if code == "store_unavailable" else 500)
                reporter.__exit__(None, None, None)
            finally:
                self._release_build()

        self.build_executor.submit(run)
        return _status_of(record)

    def _progress_callback(self, tenant: str, task_id: str, total: int, reporter: Progress | None = None) -> Progress:
        last_log = [time.monotonic()]

        def report(done: int, _total: int) -> None:
            if reporter is not None:
                reporter(done, total)
            if time.monotonic() - last_log[0] > 2.0 or done == total:
                last_log[0] = time.monotonic()
                log.info("task %s/%s: encoded %d/%d shots", tenant, task_id, done, total)

        return report

    def add_shots(self, tenant: str, task_id: str, request: ShotsRequest) -> Task:
        """Add shots (and new classes); old shots are not re-encoded; re-tunes; bumps the version."""
        labels = check_shots(request, self.settings)
        key = (tenant, task_id)
        with self._lock_for(key):
            old = self.get_task(tenant, task_id)
            names = old.class_names
            new_names = [n for n in dict.fromkeys(labels) if n not in names]
            if len(names) + len(new_names) > self.settings.max_classes:
                raise InvalidInput(
                    f"the task would have {len(names) + len(new_names)} classes; the limit is "
                    f"{self.settings.max_classes}",
                    code="too_many_classes",
                )
            redefined = sorted(set(request.classes) & set(names))
            if redefined:
                raise InvalidInput(
                    f"`classes` may only describe new classes; {redefined} already exist in the task "
                    "(their prompts are fixed)",
                    code="class_exists",
                )
            check_class_specs(request.classes, set(new_names))
            started = time.monotonic()
            progress = self._progress_callback(tenant, task_id, len(request.images))
            task = self.builder.with_shots(old, request, labels, new_names, progress)
            self._persist_and_publish(task)
            log.info(
                "task %s/%s v%d: +%d shots, %.1f s",
                tenant,
                task_id,
                task.version,
                len(request.images),
                time.monotonic() - started,
            )
            return task

    def delete_task(self, tenant: str, task_id: str) -> None:
        key = (tenant, task_id)
        with self._lock_for(key):
            build = self.build_board.get(tenant, task_id)
            if build is not None and build.state == "building":
                raise Conflict(f"task {task_id} is still building; delete it when it is ready", code="building")
            existed = self.store.delete(tenant, task_id)  # durable before we forget it
            with self._registry_lock:
                known = key in self._tasks or key in self._foreign
            self._forget(key)
            if build is not None:
                self.build_board.remove(tenant, task_id)
            if not (existed or known or build is not None):
                raise NotFound(f"task {task_id} not found", code="task_not_found")

    def _persist_and_publish(self, task: Task) -> None:
        try:
            self.store.save(to_snapshot(task))  # durable first: a task is only acknowledged once stored
        except VersionConflict as conflict:
            raise Conflict(
                f"task {task.task_id} changed while this change was being built: version {conflict.live} is "
                f"live now, this change was built on version {task.version - 1}; nothing was applied, "
                "retry it",
                code="version_conflict",
            ) from None
        self._cache(task)

    # ---- classify -----------------------------------------------------------------------------
    async def classify(
        self,
        tenant: str,
        task_id: str,
        images: Sequence[UploadedImage],
        *,
        top_k: int,
        method: str | None,
        abstain: bool,
    ) -> tuple[Task, list[Prediction]]:
        task = self.get_task(tenant, task_id)  # one version for the whole request
        if len(images) > self.settings.max_classify_files:
            raise PayloadTooLarge(
                f"{len(images)} images in one classify request; the limit is {self.settings.max_classify_files}",
                code="too_many_files",
            )
        if not images:
            raise InvalidInput("no images: send one or more `images` files", code="no_images")
        if not 1 <= top_k <= self.settings.max_top_k:
            raise InvalidInput(
                f"top_k must be between 1 and {self.settings.max_top_k}, got {top_k}", code="invalid_top_k"
            )
        if method is not None and method not in task.fits:
            raise InvalidInput(f"unknown method {method!r}; valid: {', '.join(task.fits)}", code="unknown_method")
        loop = asyncio.get_running_loop()
        self.queue.announce()  # a batch being formed waits for these pixels instead of leaving without them
        try:
            pixels = await loop.run_in_executor(self.executor, self._classify_pixels, images)
        except BaseException:
            self.queue.withdraw()
            raise
        features = await asyncio.wrap_future(self.queue.submit(pixels, announced=True))
        predictions = task.classify(features, method=method, top_k=top_k, abstain=abstain)
        metrics.IMAGES_CLASSIFIED.inc(len(predictions))
        return task, predictions

    def _classify_pixels(self, images: Sequence[UploadedImage]) -> Any:
        return self.encoder.preprocessor.eval_pixels(self.builder.decode(images))

    # ---- info ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        identity = self.encoder.identity
        return {
            "version": __version__,
            "model": {
                **identity.to_dict(),
                "backend": self.encoder.backend,
                "logit_scale": self.encoder.logit_scale,
                "input_size": self.encoder.input_size,
                "standin": identity.is_standin,
                "standin_reason": self.fallback_reason,
                "default_templates": self.encoder.default_templates,
            },
            "methods": [AUTO, *METHODS],
            "default_method": self.default_method,
            "limits": {
                "max_request_mb": self.settings.max_request_mb,
                "max_file_mb": self.settings.max_file_mb,
                "max_create_files": self.settings.max_create_files,
                "max_classify_files": self.settings.max_classify_files,
                "min_image_side": self.settings.min_image_side,
                "max_image_side": self.settings.max_image_side,
                "max_image_pixels": self.settings.max_image_pixels,
                "max_classes": self.settings.max_classes,
                "max_top_k": self.settings.max_top_k,
                "max_views": 32,
            },
            "tasks": len(self._tasks),
            "store": describe_store(self.store),
            "damaged_tasks": [{"tenant": d.tenant, "task_id": d.task_id, "reason": d.reason} for d in self.damaged],
            "queue": {"pending_images": self.queue.pending_images, "capacity": self.settings.queue_size},
        }

    def usage(self) -> dict[str, dict[str, int]]:
        return self.store.usage()
