"""Turning uploaded shots into a `Task`: decode, encode through the queue's bulk lane, class text
weights, and every method tuned by leave-one-out. Pure construction: no registry, no store, no locks
(the service core owns those)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from app import thumbnails
from app.encoder import ClassPrompts, Encoder
from app.fewshot import build_method
from app.images import ImageError, ImageLimits, decode_image
from app.settings import Settings
from cache_models import METHODS

from .build import choose_method, fit_methods, method_fit
from .errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from .queue import EncoderQueue
from .requests import CreateTaskRequest, ShotsRequest, UploadedImage, class_info
from .task import ClassInfo, FloatArray, Task

Progress = Callable[[int, int], None]  # (shots encoded, shots in the request)


def shot_seed(task_id: str, index: int) -> int:
    """The augmentation seed of a task's shot: stable, so re-encoding a shot gives the same views."""
    return int.from_bytes(hashlib.sha256(f"{task_id}:{index}".encode()).digest()[:8], "little") >> 1


class TaskBuilder:
    def __init__(
        self, settings: Settings, encoder: Encoder, queue: EncoderQueue, limits: ImageLimits, default_method: str
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.queue = queue
        self.limits = limits
        self.default_method = default_method

    def decode(self, images: Sequence[UploadedImage]) -> list[Image.Image]:
        """Decode uploads; the first bad one fails the request with its status and name."""
        out = []
        side = 2 * self.encoder.input_size  # JPEGs decode at reduced scale down to this (random crops zoom in)
        for i, upload in enumerate(images):
            name = upload.filename or f"image {i}"
            try:
                out.append(decode_image(upload.data, self.limits, filename=name, min_decode_side=side))
            except ImageError as exc:
                error_type = {413: PayloadTooLarge, 415: UnsupportedMedia}.get(exc.status, InvalidInput)
                raise error_type(str(exc), code=exc.code) from None
        return out

    def new_task(
        self, tenant: str, task_id: str, request: CreateTaskRequest, labels: Sequence[str], progress: Progress
    ) -> Task:
        images = self.decode(request.images)
        names = list(dict.fromkeys(labels))  # class order: first appearance
        classes = tuple(class_info(n, request.classes) for n in names)
        templates = tuple(request.templates) if request.templates is not None else tuple(self.encoder.default_templates)
        views = request.views or self.settings.views
        seeds = [shot_seed(task_id, i) for i in range(len(images))]
        thumbs = thumbnails.pack([thumbnails.make_thumbnail(image) for image in images])
        features = self._encode_shots(images, views, seeds, progress)
        now = time.time()
        draft = Task(
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
            shot_labels=np.array([names.index(label) for label in labels], dtype=np.int64),
            shot_seeds=np.array(seeds, dtype=np.int64),
            text=self._text_weights(classes, templates),
            thumbnail_data=thumbs[0],
            thumbnail_offsets=thumbs[1],
            fits={},
            method="zero-shot",
            method_requested=request.method or "default",
        )
        return self._fit(draft, hyperparams=request.hyperparams)

    def with_shots(
        self, old: Task, request: ShotsRequest, labels: Sequence[str], new_names: Sequence[str], progress: Progress
    ) -> Task:
        """The next version of `old`: its shots are kept as encoded, the new ones appended, re-tuned."""
        images = self.decode(request.images)
        first = int(old.shot_labels.shape[0])
        seeds = [shot_seed(old.task_id, first + i) for i in range(len(images))]
        features = self._encode_shots(images, old.views, seeds, progress)
        jpegs = [thumbnails.make_thumbnail(image) for image in images]
        if thumbnails.count(old.thumbnail_offsets) == first:
            thumbs = thumbnails.append(old.thumbnail_data, old.thumbnail_offsets, jpegs)
        else:  # a task stored before thumbnails: none for its old shots, so none for the new ones either
            thumbs = (old.thumbnail_data, old.thumbnail_offsets)
        new_classes = tuple(class_info(n, request.classes) for n in new_names)
        all_names = old.class_names + list(new_names)
        text = old.text
        if new_classes:
            text = np.concatenate([old.text, self._text_weights(new_classes, old.templates)])
        draft = replace(
            old,
            version=old.version + 1,
            updated_at=time.time(),
            classes=old.classes + new_classes,
            shot_features=np.concatenate([old.shot_features, features]),
            shot_labels=np.concatenate([old.shot_labels, np.array([all_names.index(n) for n in labels], np.int64)]),
            shot_seeds=np.concatenate([old.shot_seeds, np.array(seeds, dtype=np.int64)]),
            text=text,
            backend=self.encoder.backend,
            thumbnail_data=thumbs[0],
            thumbnail_offsets=thumbs[1],
        )
        return self._fit(draft, hyperparams=None)

    def _encode_shots(
        self, images: Sequence[Image.Image], views: int, seeds: Sequence[int], progress: Progress
    ) -> FloatArray:
        """[len(images) * views, d] through the queue's bulk lane, chunk by chunk, reporting progress."""
        per_chunk = max(1, self.settings.max_batch // views)
        parts = []
        for start in range(0, len(images), per_chunk):
            stop = min(start + per_chunk, len(images))
            pixels = self.encoder.preprocessor.view_pixels(images[start:stop], views, seeds[start:stop])
            parts.append(self.queue.encode(pixels, bulk=True))
            progress(stop, len(images))
        return np.concatenate(parts)

    def _text_weights(self, classes: Sequence[ClassInfo], templates: Sequence[str]) -> FloatArray:
        prompts = [ClassPrompts(c.name, c.prompts, c.templates) for c in classes]
        return self.encoder.class_text_weights(prompts, templates)

    def _fit(self, task: Task, *, hyperparams: Mapping[str, float] | None) -> Task:
        """Tune every method on the task's shots (the requested one fitted at `hyperparams` if given)
        and choose the one classify uses."""
        requested = task.method_requested
        scale = self.encoder.logit_scale
        args = (task.shot_features, task.shot_labels, task.text, task.views)
        if hyperparams is not None:
            try:
                fixed = build_method(requested, *args, scale=scale, hyperparams=dict(hyperparams))
            except ValueError as exc:
                raise InvalidInput(str(exc), code="invalid_hyperparams") from None
            fits = fit_methods(*args, scale=scale, methods=[m for m in METHODS if m != requested])
            fits[requested] = method_fit(fixed)
        else:
            fits = fit_methods(*args, scale=scale)
        target = self.default_method if requested == "default" else requested
        return replace(task, fits=fits, method=choose_method(target, fits, self.default_method))
