"""Turning checked shots into a `Task`: decode, encode through the queue's bulk and text lanes, and every
method tuned by leave-one-out (only the chosen one stays fitted). Pure construction: no registry, no store,
no locks, no validation (the request was checked once, in requests.py; the service core owns the rest)."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from PIL import Image

from app import thumbnails
from app.encoder import ClassPrompts, Encoder
from app.encoder.preprocess import Crops, Preprocessor
from app.fewshot import fit_method, make_supports
from app.images import ImageLimits, decode_image
from app.store import new_incarnation
from cache_models import METHODS

from .build import fit_methods, task_fits
from .queue import EncoderQueue
from .requests import CheckedCreate, CheckedShots, CheckedUpdate, UploadedImage
from .task import FloatArray, Task

Progress = Callable[[int, int], None]  # (shots encoded, shots in the request)

# Images per encoder call of a build (at most SHOTCACHE_MAX_BATCH). An inference's working memory grows with
# its batch and the backend keeps it for the largest batch it has run: ViT-B-32 on OpenVINO peaked ~36 MB
# higher after batches of 8 and 88-145 MB higher after batches of 32, while batch 8 runs as fast as 32 for
# ViT-B-32 and the stand-in (docs/benchmarks.md). Features came out bit-identical at batch 1, 8 and 32 on both
# backends; tests/service/test_build_chunks.py compares a build with one call of all its images.
BUILD_CALL_IMAGES = 8


def shot_seed(task_id: str, index: int) -> int:
    """The augmentation seed of a task's shot: stable, so re-encoding a shot gives the same views."""
    return int.from_bytes(hashlib.sha256(f"{task_id}:{index}".encode()).digest()[:8], "little") >> 1


def encode_views(
    encode: Callable[[Crops], FloatArray],
    preprocessor: Preprocessor,
    images: Sequence[Image.Image],
    views: int,
    seeds: Sequence[int],
    *,
    per_call: int,
    progress: Progress | None = None,
) -> FloatArray:
    """[len(images) * views, d]: each image's `views` augmented views (seeded per image), row i*views + v,
    encoded by `encode` in calls of at most `per_call` images. The service and `shotcache eval` both
    encode shots through this."""
    per_chunk = max(1, per_call // views)
    parts = []
    for start in range(0, len(images), per_chunk):
        stop = min(start + per_chunk, len(images))
        parts.append(encode(preprocessor.view_crops(images[start:stop], views, seeds[start:stop])))
        if progress is not None:
            progress(stop, len(images))
    return np.concatenate(parts)


class TaskBuilder:
    def __init__(
        self, encoder: Encoder, queue: EncoderQueue, limits: ImageLimits, *, max_batch: int, default_method: str
    ) -> None:
        self.encoder = encoder
        self.queue = queue
        self.limits = limits
        self.max_batch = max_batch
        self.default_method = default_method

    def decode(self, images: Sequence[UploadedImage], *, first: int = 0) -> list[Image.Image]:
        """Decode uploads (numbered from `first` in messages); the first bad one fails the request (an
        `ImageError` naming it)."""
        side = 2 * self.encoder.input_size  # JPEGs decode at reduced scale down to this (random crops zoom in)
        return [
            decode_image(upload.data, self.limits, filename=upload.filename or f"image {i}", min_decode_side=side)
            for i, upload in enumerate(images, start=first)
        ]

    def new_task(self, tenant: str, task_id: str, request: CheckedCreate, progress: Progress) -> Task:
        classes = request.new_classes
        names = [c.name for c in classes]
        templates = request.templates if request.templates is not None else tuple(self.encoder.default_templates)
        seeds = [shot_seed(task_id, i) for i in range(len(request.images))]
        features, jpegs = self._encode_shots(request.images, request.views, seeds, progress)
        thumbs = thumbnails.pack(jpegs)
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
            views=request.views,
            templates=templates,
            classes=classes,
            supports=make_supports(
                features,
                np.array([names.index(label) for label in request.labels], dtype=np.int64),
                self._text_weights(classes, templates),
                request.views,
            ),
            shot_seeds=np.array(seeds, dtype=np.int64),
            thumbnail_data=thumbs[0],
            thumbnail_offsets=thumbs[1],
            fits={},
            method="zero-shot",
            method_requested=request.method_requested,
            incarnation=new_incarnation(),
        )
        return self._fit(draft, target=request.target, hyperparams=request.hyperparams)

    def with_shots(self, old: Task, request: CheckedShots, progress: Progress) -> Task:
        """The next version of `old`: its shots are kept as encoded, the new ones appended, re-tuned."""
        first = int(old.shot_labels.shape[0])
        seeds = [shot_seed(old.task_id, first + i) for i in range(len(request.images))]
        features, jpegs = self._encode_shots(request.images, old.views, seeds, progress)
        if thumbnails.count(old.thumbnail_offsets) == first:
            thumbs = thumbnails.append(old.thumbnail_data, old.thumbnail_offsets, jpegs)
        else:  # a task stored before thumbnails: none for its old shots, so none for the new ones either
            thumbs = (old.thumbnail_data, old.thumbnail_offsets)
        all_names = old.class_names + [c.name for c in request.new_classes]
        text = old.text
        if request.new_classes:
            text = np.concatenate([old.text, self._text_weights(request.new_classes, old.templates)])
        draft = replace(
            old,
            version=old.version + 1,
            updated_at=time.time(),
            classes=old.classes + request.new_classes,
            supports=make_supports(
                np.concatenate([old.shot_features, features]),
                np.concatenate([old.shot_labels, np.array([all_names.index(n) for n in request.labels], np.int64)]),
                text,
                old.views,
            ),
            shot_seeds=np.concatenate([old.shot_seeds, np.array(seeds, dtype=np.int64)]),
            backend=self.encoder.backend,
            thumbnail_data=thumbs[0],
            thumbnail_offsets=thumbs[1],
        )
        target = self.default_method if old.method_requested == "default" else old.method_requested
        return self._fit(draft, target=target, hyperparams=None)

    def updated(self, old: Task, request: CheckedUpdate) -> Task:
        """The next version of `old` with another name and/or method; the shots are kept as encoded. A
        method change re-tunes every method as a build does (`auto` ranks them again); a rename keeps the
        fits and what is fitted."""
        draft = replace(
            old,
            version=old.version + 1,
            updated_at=time.time(),
            name=request.name if request.rename else old.name,
            method_requested=request.method_requested or old.method_requested,
        )
        if request.method_requested is None:
            for name in old.members():
                draft.fitted.keep(old.model(name))
            return draft
        return self._fit(draft, target=request.method_requested, hyperparams=None)

    def _encode_shots(
        self, uploads: Sequence[UploadedImage], views: int, seeds: Sequence[int], progress: Progress
    ) -> tuple[FloatArray, list[bytes]]:
        """([len(uploads) * views, d] features, one thumbnail JPEG per upload), through the queue's bulk
        lane. Uploads are decoded one encoder call's worth at a time and dropped once encoded, so a build
        holds one chunk of decoded images, not all of them (a photo decoded at 960 x 540 is 1.5 MB: 160 of
        them, 250 MB)."""
        per_call = min(self.max_batch, BUILD_CALL_IMAGES)
        per_chunk = max(1, per_call // views)
        parts: list[FloatArray] = []
        jpegs: list[bytes] = []
        for start in range(0, len(uploads), per_chunk):
            chunk = uploads[start : start + per_chunk]
            images = self.decode(chunk, first=start)
            jpegs.extend(thumbnails.make_thumbnail(image) for image in images)
            encode = functools.partial(self.queue.encode, bulk=True)
            seeds_of_chunk = seeds[start : start + len(chunk)]
            parts.append(
                encode_views(encode, self.encoder.preprocessor, images, views, seeds_of_chunk, per_call=per_call)
            )
            del images
            progress(start + len(chunk), len(uploads))
        return np.concatenate(parts), jpegs

    def _text_weights(self, classes: Sequence[ClassPrompts], templates: Sequence[str]) -> FloatArray:
        return self.encoder.class_text_weights(classes, templates, encode_texts=self.queue.encode_texts)

    def _fit(self, task: Task, *, target: str, hyperparams: Mapping[str, float] | None) -> Task:
        """Tune every method on the task's shots (`target` fitted at `hyperparams` if given) and choose
        the one classify uses."""
        scale = self.encoder.logit_scale
        if hyperparams is not None:
            fixed = fit_method(target, task.supports, scale=scale, hyperparams=dict(hyperparams))
            tuned = fit_methods(task.supports, scale=scale, methods=[m for m in METHODS if m != target])
            tuned[target] = fixed
        else:
            tuned = fit_methods(task.supports, scale=scale)
        method, fits, selection = task_fits(target, tuned, self.default_method)
        built = replace(task, fits=fits, method=method, selection=selection)
        for name in built.members():  # the others are fitted again on first use (task.py)
            built.fitted.keep(tuned[name])
        return built
