"""The service core: tasks in memory and on disk, builds, classification.

The HTTP layer calls this and nothing deeper. Blocking methods (`create_task`, `add_shots`,
`delete_task`) run in the caller's worker thread; `classify` is async and awaits the encoder queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from app import __version__
from app.encoder import ClassPrompts, Encoder
from app.encoder.factory import ModelDefaults
from app.images import ImageError, ImageLimits, decode_image
from app.settings import Settings
from app.store import DamagedTask, TaskStore
from cache_models import METHODS

from . import metrics
from .build import AUTO, choose_method, fit_methods
from .errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, ServiceError, UnsupportedMedia
from .persist import from_snapshot, to_snapshot
from .queue import EncoderQueue
from .requests import (
    CreateTaskRequest,
    ShotsRequest,
    UploadedImage,
    check_class_specs,
    check_create,
    check_shots,
    class_info,
)
from .task import ClassInfo, FloatArray, Prediction, Task

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


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


def shot_seed(task_id: str, index: int) -> int:
    """The augmentation seed of a task's shot: stable, so re-encoding a shot gives the same views."""
    return int.from_bytes(hashlib.sha256(f"{task_id}:{index}".encode()).digest()[:8], "little") >> 1


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
        self._tasks: dict[tuple[str, str], Task] = {}
        self._foreign: dict[tuple[str, str], str] = {}  # tasks built with another model: their model id
        self._builds: dict[tuple[str, str], BuildStatus] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._registry_lock = threading.Lock()
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

    # ---- images -------------------------------------------------------------------------------
    def decode(self, images: Sequence[UploadedImage]) -> list[Image.Image]:
        """Decode uploads; the first bad one fails the request with its status and name."""
        out = []
        side = 2 * self.encoder.input_size
        for i, upload in enumerate(images):
            name = upload.filename or f"image {i}"
            try:
                out.append(decode_image(upload.data, self.limits, filename=name, min_decode_side=side))
            except ImageError as exc:
                error_type = {413: PayloadTooLarge, 415: UnsupportedMedia}.get(exc.status, InvalidInput)
                raise error_type(str(exc), code=exc.code) from None
        return out

    def _encode_shots(
        self, images: Sequence[Image.Image], views: int, seeds: Sequence[int], progress: Progress | None
    ) -> FloatArray:
        """[len(images) * views, d] through the queue's bulk lane, chunk by chunk, reporting progress."""
        per_chunk = max(1, self.settings.max_batch // views)
        parts = []
        for start in range(0, len(images), per_chunk):
            stop = min(start + per_chunk, len(images))
            pixels = self.encoder.preprocessor.view_pixels(images[start:stop], views, seeds[start:stop])
            parts.append(self.queue.encode(pixels, bulk=True))
            if progress is not None:
                progress(stop, len(images))
        return np.concatenate(parts)

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
        images = self.decode(request.images)
        names = list(dict.fromkeys(labels))  # class order: first appearance
        classes = tuple(class_info(n, request.classes) for n in names)
        templates = tuple(request.templates) if request.templates is not None else tuple(self.encoder.default_templates)
        views = request.views or self.settings.views
        seeds = [shot_seed(task_id, i) for i in range(len(images))]
        progress = self._progress_callback(tenant, task_id, len(images))
        features = self._encode_shots(images, views, seeds, progress)
        shot_labels = np.array([names.index(label) for label in labels], dtype=np.int64)
        text = self._text_weights(classes, templates)
        now = time.time()
        task = self._fit(
            Task(
                tenant=tenant,
                task_id=task_id,
                name=request.name,
                version=1,
                created_at=now,
                updated_at=now,
                model_id=self.encoder.identity.model_id,
                backend=self.encoder.backend,
                views=views,
                templates=templates,
                classes=classes,
                shot_features=features,
                shot_labels=shot_labels,
                shot_seeds=np.array(seeds, dtype=np.int64),
                text=text,
                fits={},
                method="zero-shot",
                method_requested=request.method or "default",
            ),
            hyperparams=request.hyperparams,
        )
        self._persist_and_publish(task)
        metrics.TASK_BUILD_SECONDS.observe(time.monotonic() - started)
        log.info(
            "task %s/%s created: %d shots, %d classes, method %s, %.1f s",
            tenant,
            task_id,
            len(images),
            len(classes),
            task.method,
            time.monotonic() - started,
        )
        return task

    def start_create(self, tenant: str, request: CreateTaskRequest) -> BuildStatus:
        """Validate now, build in the background; progress via `build_status`."""
        check_create(request, self.settings)
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
            images = self.decode(request.images)
            first = int(old.shot_labels.shape[0])
            seeds = [shot_seed(task_id, first + i) for i in range(len(images))]
            features = self._encode_shots(
                images, old.views, seeds, self._progress_callback(tenant, task_id, len(images))
            )
            new_classes = tuple(class_info(n, request.classes) for n in new_names)
            all_names = names + new_names
            text = old.text
            if new_classes:
                text = np.concatenate([old.text, self._text_weights(new_classes, old.templates)])
            updated = replace(
                old,
                version=old.version + 1,
                updated_at=time.time(),
                classes=old.classes + new_classes,
                shot_features=np.concatenate([old.shot_features, features]),
                shot_labels=np.concatenate(
                    [old.shot_labels, np.array([all_names.index(n) for n in labels], dtype=np.int64)]
                ),
                shot_seeds=np.concatenate([old.shot_seeds, np.array(seeds, dtype=np.int64)]),
                text=text,
                backend=self.encoder.backend,
            )
            task = self._fit(updated, hyperparams=None)
            self._persist_and_publish(task)
            log.info(
                "task %s/%s v%d: +%d shots, %.1f s",
                tenant,
                task_id,
                task.version,
                len(images),
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

    def _text_weights(self, classes: Sequence[ClassInfo], templates: Sequence[str]) -> FloatArray:
        prompts = [ClassPrompts(c.name, c.prompts, c.templates) for c in classes]
        return self.encoder.class_text_weights(prompts, templates)

    def _fit(self, task: Task, *, hyperparams: Any) -> Task:
        """Tune every method on the task's shots and choose the one classify uses."""
        requested = task.method_requested
        scale = self.encoder.logit_scale
        if hyperparams is not None:
            from app.fewshot import build_method

            from .build import method_fit

            try:
                method = build_method(
                    requested,
                    task.shot_features,
                    task.shot_labels,
                    task.text,
                    task.views,
                    scale=scale,
                    hyperparams=dict(hyperparams),
                )
            except ValueError as exc:
                raise InvalidInput(str(exc), code="invalid_hyperparams") from None
            fits = fit_methods(
                task.shot_features,
                task.shot_labels,
                task.text,
                task.views,
                scale=scale,
                methods=[m for m in METHODS if m != requested],
            )
            fits[requested] = method_fit(method)
        else:
            fits = fit_methods(task.shot_features, task.shot_labels, task.text, task.views, scale=scale)
        chosen = choose_method(requested if requested != "default" else self.default_method, fits, self.default_method)
        return replace(task, fits=fits, method=chosen)

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
        pixels = await loop.run_in_executor(self.executor, self._classify_pixels, images)
        features = await asyncio.wrap_future(self.queue.submit(pixels))
        predictions = task.classify(features, method=method, top_k=top_k, abstain=abstain)
        metrics.IMAGES_CLASSIFIED.inc(len(predictions))
        return task, predictions

    def _classify_pixels(self, images: Sequence[UploadedImage]) -> Any:
        return self.encoder.preprocessor.eval_pixels(self.decode(images))

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
