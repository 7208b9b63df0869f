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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from app import __version__
from app.encoder import Encoder
from app.encoder.factory import ModelDefaults
from app.images import ImageLimits
from app.settings import Settings
from app.store import DamagedTask, TaskStore
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
        self._tasks: dict[tuple[str, str], Task] = {}
        self._foreign: dict[tuple[str, str], str] = {}  # tasks built with another model: their model id
        self._builds: dict[tuple[str, str], BuildStatus] = {}
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
        """Load every stored task; damaged ones are reported and skipped, never fatal."""
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
                self._tasks[key] = from_snapshot(snapshot)
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
        task = self._tasks.get(key)
        if task is not None:
            return task
        if key in self._foreign:
            raise Conflict(
                f"task {task_id} was built with model {self._foreign[key]}; this server runs "
                f"{self.encoder.identity.model_id}. Serve it with that model or rebuild it.",
                code="model_mismatch",
            )
        if key in self._builds:
            build = self._builds[key]
            raise Conflict(f"task {task_id} is still building ({build.done}/{build.total} images)", code="building")
        raise NotFound(f"task {task_id} not found", code="task_not_found")

    def build_status(self, tenant: str, task_id: str) -> BuildStatus | None:
        return self._builds.get((tenant, task_id))

    def list_tasks(self, tenant: str) -> list[Task]:
        return sorted((t for (ten, _), t in self._tasks.items() if ten == tenant), key=lambda t: t.created_at)

    def builds(self, tenant: str) -> list[BuildStatus]:
        return [b for (ten, _), b in self._builds.items() if ten == tenant]

    def create_task(self, tenant: str, request: CreateTaskRequest, *, task_id: str | None = None) -> Task:
        """Decode, encode, tune and persist a new task; returns it once it is durable."""
        labels = check_create(request, self.settings)
        task_id = task_id or uuid.uuid4().hex
        started = time.monotonic()
        progress = self._progress_callback(tenant, task_id, len(request.images))
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
        """Validate now, build in the background; progress via `build_status`."""
        check_create(request, self.settings)
        self._admit_build()
        task_id = uuid.uuid4().hex
        status = BuildStatus(tenant, task_id, total=len(request.images), started_at=time.time())
        self._builds[(tenant, task_id)] = status

        def run() -> None:
            try:
                self.create_task(tenant, request, task_id=task_id)
                del self._builds[(tenant, task_id)]
            except ServiceError as exc:
                status.error, status.error_status = {"code": exc.code, "message": exc.message}, exc.status
                status.state = "failed"
            except Exception as exc:  # reported through the status endpoint, and logged
                log.exception("background build of %s/%s failed", tenant, task_id)
                status.error, status.error_status = {"code": "internal_error", "message": str(exc)}, 500
                status.state = "failed"
            finally:
                self._release_build()

        self.build_executor.submit(run)
        return status

    def _progress_callback(self, tenant: str, task_id: str, total: int) -> Progress:
        last_log = [time.monotonic()]

        def report(done: int, _total: int) -> None:
            status = self._builds.get((tenant, task_id))
            if status is not None:
                status.done = done
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
            known = key in self._tasks or key in self._foreign
            if not known and key not in self._builds:
                raise NotFound(f"task {task_id} not found", code="task_not_found")
            if key in self._builds and self._builds[key].state == "building":
                raise Conflict(f"task {task_id} is still building; delete it when it is ready", code="building")
            self.store.delete(tenant, task_id)  # durable before we forget it
            self._tasks.pop(key, None)
            self._foreign.pop(key, None)
            self._builds.pop(key, None)
            metrics.TASKS_STORED.set(len(self._tasks))

    def _persist_and_publish(self, task: Task) -> None:
        self.store.save(to_snapshot(task))  # durable first: a task is only acknowledged once on disk
        self._tasks[(task.tenant, task.task_id)] = task
        metrics.TASKS_STORED.set(len(self._tasks))

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
        evidence: int = 0,
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
        if not 0 <= evidence <= self.settings.max_top_k:
            raise InvalidInput(
                f"evidence must be between 0 and {self.settings.max_top_k}, got {evidence}", code="invalid_evidence"
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
        predictions = task.classify(features, method=method, top_k=top_k, abstain=abstain, evidence=evidence)
        metrics.IMAGES_CLASSIFIED.inc(len(predictions))
        return task, predictions

    def thumbnail(self, tenant: str, task_id: str, shot: int) -> bytes:
        """A shot's stored thumbnail (JPEG)."""
        jpeg = self.get_task(tenant, task_id).thumbnail(shot)
        if jpeg is None:
            raise NotFound(f"task {task_id} has no thumbnail for shot {shot}", code="shot_not_found")
        return jpeg

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
            "damaged_tasks": [{"tenant": d.tenant, "task_id": d.task_id, "reason": d.reason} for d in self.damaged],
            "queue": {"pending_images": self.queue.pending_images, "capacity": self.settings.queue_size},
        }

    def usage(self) -> dict[str, dict[str, int]]:
        return self.store.usage()
