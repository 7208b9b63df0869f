"""The classify request's stages, off the event loop: decode + crop on the classify pool, encode on the encoder
queue, predict back on the pool (or on the encoder thread: `predicts_on_encoder_thread`), then one future
settled with the answer. The stages hand over to each other directly, so the event loop is woken once per
request instead of after every stage (docs/benchmarks.md, request path); every failure, and a stage the pool
drops at shutdown, ends in that future. The service core owns the pool and the queue; this runs on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any, TypeVar

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

        def predict(encoded: Future[FloatArray]) -> None:  # on the pool or the encoder thread
            try:
                settle(answer, self._predict(task, encoded.result(), checked))
            except BaseException as exc:
                settle(answer, exc)

        def encoded(done: Future[FloatArray]) -> None:  # on the encoder thread
            try:
                if self.predicts_on_encoder_thread(task, checked):
                    predict(done)
                else:
                    self._on_pool(answer, predict, done)
            except BaseException as exc:  # the pool is shut down
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

    @staticmethod
    def _predict(task: Task, features: Any, checked: CheckedClassify) -> list[Prediction]:
        return task.classify(
            features, method=checked.method, top_k=checked.top_k, abstain=checked.abstain, evidence=checked.evidence
        )


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
