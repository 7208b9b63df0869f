"""The service core: one async API over tasks, and the owner of every pool, lock and admission decision.

The HTTP layer parses a request, calls one method here and maps the answer; it schedules nothing.
Every method is async and keeps the event loop free: decoding, the cache math, softmax/top-k, builds
and store I/O run on the service's own thread pools, encoding on the encoder queue's thread.

- `Admission` (admission.py) hands out the permits: builds, and classify images; its `Busy` is the
  only source of 429s.
- `TaskRegistry` (registry.py) holds the tasks: a cache over the store, one lock, immutable values.
- `RequestRules` (requests.py) checks each request once.
- Pools: `classify` (decode + cache math of classify requests), `builds` (task builds), `io` (store reads
  and deletes), so a long build never takes the threads classify needs. The cache math never runs on the
  event loop (a first use of another method fits it, up to ~1 s). One exception to the pool: a small task's
  already-fitted method predicts on the encoder thread when no other encoder work waits, saving a thread
  hand-off per request; on the pool, the requests of one encoder batch that ask one task the same way share
  one predict. The classify request's stages over the pool and the queue: classify_stages.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from app import __version__
from app.encoder import Encoder
from app.encoder.factory import ModelDefaults
from app.errors import AppError, ErrorCode
from app.heap import release_freed_memory
from app.images import ImageLimits
from app.settings import MAX_VIEWS, Settings
from app.store import TaskStore
from app.store.base import StoreUnavailable
from app.store.factory import describe_store, outage, ping
from cache_models import METHODS

from . import metrics
from .admission import Admission, Permit
from .builder import Progress, TaskBuilder
from .classify_stages import ClassifyStages
from .persist import from_snapshot, to_snapshot
from .queue import EncoderQueue
from .registry import BuildStatus, Key, TaskRegistry
from .requests import (
    AUTO,
    AddShotsRequest,
    CheckedCreate,
    CheckedUpdate,
    ClassifyRequest,
    CreateTaskRequest,
    RequestRules,
    UpdateTaskRequest,
)
from .task import Prediction, Task

log = logging.getLogger(__name__)

T = TypeVar("T")

# Readiness answers fast during a store outage: the ping waits READY_PING_S for a connection at most (a
# busy pool or a database that is down), and /readyz never waits more than READY_DEADLINE_S for it.
READY_PING_S = 1.0
READY_DEADLINE_S = 2.0


@dataclass(frozen=True)
class Classification:
    """One classify answer: the task version that answered, and one prediction per image."""

    task: Task
    predictions: list[Prediction]


@dataclass(frozen=True)
class TaskListing:
    tasks: list[Task]
    building: list[BuildStatus]


class TaskService:
    def __init__(self, settings: Settings, encoder: Encoder, store: TaskStore, *, fallback: str | None) -> None:
        self.settings = settings
        self.encoder = encoder
        self.fallback_reason = fallback
        self.default_method = ModelDefaults.for_key(encoder.loaded.config_key).default_method
        self.rules = RequestRules(settings, default_method=self.default_method)
        self.limits = ImageLimits(
            max_file_bytes=int(settings.max_file_mb * 1024 * 1024),
            min_side=settings.min_image_side,
            max_side=settings.max_image_side,
            max_pixels=settings.max_image_pixels,
        )
        self.queue = EncoderQueue(
            encoder,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            fill_wait_cap_s=settings.fill_wait_cap_ms / 1000.0,
        )
        self.admission = Admission(
            max_builds=settings.max_pending_builds,
            max_classify_images=settings.queue_size,
            images_per_second=lambda: self.queue.images_per_second,
        )
        self.registry = TaskRegistry(
            store,
            from_snapshot,
            to_snapshot,
            model_id=encoder.identity.model_id,
            # A shared store (PostgreSQL) is written by every replica: check the live version per request.
            check_freshness=settings.check_freshness or bool(getattr(store, "shared", False)),
            budget_bytes=int(settings.task_cache_mb * 2**20),
            # Background builds on a board every replica reads (shared store only): any replica can answer the poll.
            build_board=getattr(store, "builds", None),
        )
        self.builder = TaskBuilder(
            encoder, self.queue, self.limits, max_batch=settings.max_batch, default_method=self.default_method
        )
        workers = settings.workers
        self._classify_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shotcache-classify")
        self._build_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shotcache-build")
        self._io_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shotcache-io")
        self._stages = ClassifyStages(encoder, self.builder, self.queue, self._classify_pool)
        self.ready = False

    @property
    def store(self) -> TaskStore:
        return self.registry.store

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self.registry.restore()
        self.queue.start()
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.queue.stop()
        for pool in (self._classify_pool, self._build_pool, self._io_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- the API ------------------------------------------------------------------------------
    async def get(self, tenant: str, task_id: str) -> Task:
        """The task (task_not_found, building, model_mismatch otherwise)."""
        key = (tenant, task_id)
        task = self.registry.cached(key)
        if task is not None:
            return task
        return await self._run(self._io_pool, self.registry.get, key)

    async def build_status(self, tenant: str, task_id: str) -> BuildStatus | None:
        """The background build of this id, if one is running or has failed."""
        return self.registry.build_status((tenant, task_id))

    async def list(self, tenant: str) -> TaskListing:
        tasks = await self._run(self._io_pool, self.registry.list, tenant)
        return TaskListing(tasks, self.registry.builds(tenant))

    async def create(self, tenant: str, request: CreateTaskRequest) -> Task | BuildStatus:
        """Build a task and return it once durable; with `wait=False`, return its `BuildStatus` at once
        and build in the background (poll `build_status` / `get`)."""
        checked = self.rules.create(request)
        permit = self.admission.build()
        task_id = uuid.uuid4().hex
        if checked.wait:
            try:
                return await self._run(self._build_pool, self._create, tenant, task_id, checked)
            finally:
                permit.release()
        status = BuildStatus(tenant, task_id, total=len(checked.images), started_at=time.time())
        self.registry.start_build(status)
        try:
            self._build_pool.submit(self._create_in_background, tenant, task_id, checked, permit)
        except BaseException:
            self.registry.end_build((tenant, task_id), None)
            permit.release()
            raise
        return status

    async def add_shots(self, tenant: str, task_id: str, request: AddShotsRequest) -> Task:
        """Add shots (and new classes); old shots are not re-encoded; re-tunes; the version goes up."""
        await self.get(tenant, task_id)  # not found / building before taking a build permit
        with self.admission.build():
            return await self._run(self._build_pool, self._add_shots, (tenant, task_id), request)

    async def update(self, tenant: str, task_id: str, request: UpdateTaskRequest) -> Task:
        """Another method (re-chosen from the stored shots: nothing is re-encoded) and/or another name; the
        version goes up. A method change re-tunes like a build, so it takes a build permit."""
        await self.get(tenant, task_id)
        checked = self.rules.update(request)
        with self.admission.build():
            return await self._run(self._build_pool, self._update, (tenant, task_id), checked)

    async def delete(self, tenant: str, task_id: str) -> None:
        key = (tenant, task_id)
        await self._run(self._io_pool, self._delete, key)

    async def classify(self, tenant: str, task_id: str, request: ClassifyRequest) -> Classification:
        task = await self.get(tenant, task_id)  # one version for the whole request
        checked = self.rules.classify(request, task)
        with self.admission.classify(len(checked.images)):
            predictions = await asyncio.wrap_future(self._stages.start(task, checked))
        metrics.IMAGES_CLASSIFIED.inc(len(predictions))
        return Classification(task, predictions)

    async def thumbnail(self, tenant: str, task_id: str, shot: int) -> bytes:
        """A shot's stored thumbnail (JPEG), made when the shot was added."""
        jpeg = (await self.get(tenant, task_id)).thumbnail(shot)
        if jpeg is None:
            raise AppError(ErrorCode.SHOT_NOT_FOUND, f"task {task_id} has no thumbnail for shot {shot}")
        return jpeg

    async def usage(self) -> dict[str, dict[str, int]]:
        return await self._run(self._io_pool, self.store.usage)

    async def store_problem(self) -> str | None:
        """Why the task store cannot serve right now (None: it can), for /readyz, answered within
        READY_DEADLINE_S: a known outage at once (no I/O, no thread); else one ping on asyncio's default
        executor (not the I/O pool, which requests held up by the outage may fill), bounded by the store."""
        known = outage(self.store)
        if known is not None:
            return known
        try:
            await asyncio.wait_for(asyncio.to_thread(ping, self.store, READY_PING_S), READY_DEADLINE_S)
        except StoreUnavailable as error:
            return str(error)
        except TimeoutError:  # a round trip hung past the store's own bound (a half-open socket)
            return f"task store {describe_store(self.store)} did not answer within {READY_DEADLINE_S:g} s"
        return None

    def info(self) -> dict[str, Any]:
        identity = self.encoder.identity
        return {
            "version": __version__,
            "model": {
                **identity.to_dict(),
                "backend": self.encoder.backend,
                # How `auto` chose it on this host (candidates' img/s and min cosine); None when configured.
                "backend_choice": self.encoder.backend_choice,
                # An exported text tower is open only around builds (backends/on_demand.py).
                "text_tower": self.encoder.text_tower_state,
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
                "max_views": MAX_VIEWS,
            },
            "tasks": len(self.registry),
            "store": describe_store(self.store),
            "damaged_tasks": [
                {"tenant": d.tenant, "task_id": d.task_id, "reason": d.reason} for d in self.registry.damaged
            ],
            "queue": {"pending_images": self.admission.pending_images, "capacity": self.settings.queue_size},
        }

    # ---- work on the pools (blocking) ---------------------------------------------------------
    @staticmethod
    async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _create(self, tenant: str, task_id: str, checked: CheckedCreate) -> Task:
        started = time.monotonic()
        key = (tenant, task_id)
        with self.registry.writing(key):
            task = self.builder.new_task(tenant, task_id, checked, self._progress(key, len(checked.images)))
            self.registry.save(task)
        release_freed_memory()  # the tuning's temporaries (heap.py)
        metrics.TASK_BUILD_SECONDS.observe(time.monotonic() - started)
        log.info(
            "task %s/%s created: %d shots, %d classes, method %s, %.1f s",
            tenant,
            task_id,
            len(checked.images),
            len(task.classes),
            task.method,
            time.monotonic() - started,
        )
        return task

    def _create_in_background(self, tenant: str, task_id: str, checked: CheckedCreate, permit: Permit) -> None:
        key = (tenant, task_id)
        try:
            self._create(tenant, task_id, checked)
            self.registry.end_build(key, None)
        except AppError as exc:
            self.registry.end_build(key, exc)
        except Exception:  # reported through the status endpoint, and logged
            log.exception("background build of %s/%s failed", tenant, task_id)
            self.registry.end_build(key, AppError(ErrorCode.INTERNAL_ERROR, "the build failed; it has been logged"))
        finally:
            permit.release()

    def _add_shots(self, key: Key, request: AddShotsRequest) -> Task:
        started = time.monotonic()
        with self.registry.writing(key):
            old = self.registry.get(key)
            checked = self.rules.add_shots(request, old)
            task = self.builder.with_shots(old, checked, self._progress(key, len(checked.images)))
            self.registry.save(task)
        release_freed_memory()
        metrics.TASK_BUILD_SECONDS.observe(time.monotonic() - started)
        log.info(
            "task %s/%s v%d: +%d shots, %.1f s", *key, task.version, len(checked.images), time.monotonic() - started
        )
        return task

    def _update(self, key: Key, checked: CheckedUpdate) -> Task:
        started = time.monotonic()
        with self.registry.writing(key):
            task = self.builder.updated(self.registry.get(key), checked)
            self.registry.save(task)
        release_freed_memory()
        log.info(
            "task %s/%s v%d: updated (method %s), %.1f s", *key, task.version, task.method, time.monotonic() - started
        )
        return task

    def _delete(self, key: Key) -> None:
        with self.registry.writing(key):
            self.registry.delete(key)

    def _progress(self, key: Key, total: int) -> Progress:
        last_log = [time.monotonic()]

        def report(done: int, _total: int) -> None:
            self.registry.build_progress(key, done)
            if time.monotonic() - last_log[0] > 2.0 or done == total:
                last_log[0] = time.monotonic()
                log.info("task %s/%s: encoded %d/%d shots", *key, done, total)

        return report
