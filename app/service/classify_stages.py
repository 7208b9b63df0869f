"""The classify request's stages, off the event loop: decode + crop on the classify pool, encode on the encoder
queue, predict back on the pool (or on the encoder thread: `predicts_on_encoder_thread`), then one future
settled with the answer. The stages hand over to each other directly, so the event loop is woken once per
request instead of after every stage (docs/benchmarks.md, request path); every failure, and a stage the pool
drops at shutdown, ends in that future. The service core owns the pool and the queue; this runs on them.

Predicts on the pool are coalesced (`PredictCoalescer`): the requests of one encoder batch land together, and
those that ask the same task the same way are predicted in one cache-math call on one pool thread instead of
one call and one thread wake-up each (docs/benchmarks.md, request path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from app.encoder import Encoder
from app.encoder.preprocess import Crops

from .builder import TaskBuilder
from .queue import EncoderQueue, shutting_down
from .requests import CheckedClassify, UploadedImage
from .task import FloatArray, Prediction, Task

T = TypeVar("T")

# A task whose shots' features and class text take at most this many bytes is predicted on the encoder
# thread when nothing else waits for the encoder (`predicts_on_encoder_thread`); 10 classes x 16 shots of
# the stand-in (d = 1280) take 0.9 MB, and predicting one image against them ~60 us in-process.
INLINE_PREDICT_MAX_BYTES = 2 * 2**20


class ClassifyStages:
    def __init__(self, encoder: Encoder, builder: TaskBuilder, queue: EncoderQueue, pool: ThreadPoolExecutor) -> None:
        self.encoder = encoder
        self.builder = builder
        self.queue = queue
        self.pool = pool
        self.coalescer = PredictCoalescer(pool)

    def start(self, task: Task, checked: CheckedClassify) -> Future[list[Prediction]]:
        """Start the stages of one request; the future settles with its predictions or its failure."""
        self.queue.announce()  # a batch being formed waits for these crops instead of leaving without them
        answer: Future[list[Prediction]] = Future()
        try:
            self._on_pool(answer, self._run, task, checked, answer, announced=True)
        except BaseException:
            self.queue.withdraw()
            raise
        return answer

    def _run(self, task: Task, checked: CheckedClassify, answer: Future[list[Prediction]]) -> None:
        """Decode + crop here (a classify-pool thread), encode on the queue, predict, settle `answer`."""
        if answer.cancelled():  # the client went away while this waited for a thread
            self.queue.withdraw()
            return
        try:
            crops = self._crops(checked.images)
        except BaseException as exc:
            self.queue.withdraw()
            settle(answer, exc)
            return
        try:
            features = self.queue.submit(crops, announced=True)
        except BaseException as exc:
            settle(answer, exc)
            return

        def encoded(done: Future[FloatArray]) -> None:  # on the encoder thread
            try:
                features = done.result()
                if self.predicts_on_encoder_thread(task, checked):
                    settle(answer, predict(task, features, checked))
                else:
                    self.coalescer.add(Pending(task, checked, features, answer))
            except BaseException as exc:  # the encoder failed, or the pool is shut down
                settle(answer, exc)

        features.add_done_callback(encoded)

    def predicts_on_encoder_thread(self, task: Task, checked: CheckedClassify) -> bool:
        """Whether the encoder thread, where the features land, should predict itself instead of waking a
        pool thread (one thread hand-off less per request: docs/benchmarks.md, request path). Only when it is
        cheap and costs the encoder nothing: the method is fitted already (a first use fits it, up to ~1 s,
        which must not stall the encoder), the task is small (its cache math is then well under a
        millisecond) and the encoder has nothing else to do (under load, or for a batch of several requests,
        the pool predicts while the encoder goes on)."""
        return (
            task.supports.nbytes <= INLINE_PREDICT_MAX_BYTES
            and task.is_fitted(checked.method)
            and not self.queue.has_other_work
        )

    def _on_pool(self, answer: Future[Any], fn: Callable[..., None], *args: Any, announced: bool = False) -> None:
        """Run `fn` on the classify pool; if the pool drops it unrun (shutdown), `answer` fails (and the
        queue stops waiting for its `announced` job)."""

        def dropped(job: Future[None]) -> None:
            if job.cancelled():
                if announced:
                    self.queue.withdraw()
                settle(answer, shutting_down())

        self.pool.submit(fn, *args).add_done_callback(dropped)

    def _crops(self, images: Sequence[UploadedImage]) -> Crops:
        return self.encoder.preprocessor.eval_crops(self.builder.decode(images))


def predict(task: Task, features: FloatArray, checked: CheckedClassify) -> list[Prediction]:
    """The request's cache math: its task's answer for each of its feature rows."""
    return task.classify(
        features, method=checked.method, top_k=checked.top_k, abstain=checked.abstain, evidence=checked.evidence
    )


@dataclass(frozen=True)
class Pending:
    """A request whose features are in, waiting for its predict on the pool."""

    task: Task
    checked: CheckedClassify
    features: FloatArray
    answer: Future[list[Prediction]]

    @property
    def key(self) -> tuple[int, str | None, int, bool, int]:
        """Requests with equal keys ask the same task object (one version of it) the same question."""
        c = self.checked
        return id(self.task), c.method, c.top_k, c.abstain, c.evidence


class PredictCoalescer:
    """Predicts on the pool the requests that arrive while a predict is waiting for a thread, grouped.

    `add` queues a request and, unless a drain is already scheduled, schedules one; a drain takes every
    request queued by then and predicts each group of equal `Pending.key` in one `predict` call on the
    stacked features (every method scores query rows independently, so each request gets the rows it
    would get alone, up to float rounding of the bigger matrix product). If a group's call fails, its
    requests are predicted one by one, so each gets its own outcome."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._pending: list[Pending] = []
        self._scheduled = False

    def add(self, item: Pending) -> None:
        with self._lock:
            self._pending.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._pool.submit(self._drain).add_done_callback(self._dropped)
        except BaseException as exc:  # the pool is shut down: nothing will drain
            for pending in self._take():
                settle(pending.answer, exc)

    def _take(self) -> list[Pending]:
        with self._lock:
            items, self._pending = self._pending, []
            self._scheduled = False
        return items

    def _dropped(self, job: Future[None]) -> None:
        if job.cancelled():  # the pool dropped the drain unrun (shutdown)
            for pending in self._take():
                settle(pending.answer, shutting_down())

    def _drain(self) -> None:
        groups: dict[tuple[int, str | None, int, bool, int], list[Pending]] = {}
        for item in self._take():
            groups.setdefault(item.key, []).append(item)
        for group in groups.values():
            if len(group) == 1 or not self._predict_together(group):
                for item in group:
                    try:
                        settle(item.answer, predict(item.task, item.features, item.checked))
                    except BaseException as exc:
                        settle(item.answer, exc)

    @staticmethod
    def _predict_together(group: Sequence[Pending]) -> bool:
        """One predict for the group's stacked rows, split back per request; False if it failed."""
        first = group[0]
        try:
            predictions = predict(first.task, np.concatenate([item.features for item in group]), first.checked)
        except Exception:
            return False
        row = 0
        for item in group:
            rows = int(item.features.shape[0])
            settle(item.answer, predictions[row : row + rows])
            row += rows
        return True


def settle(future: Future[T], outcome: T | BaseException) -> None:
    """Resolve `future` with a result or an exception, unless it is already settled or cancelled (the
    client went away: its awaiting coroutine was cancelled, which cancels the future)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass
