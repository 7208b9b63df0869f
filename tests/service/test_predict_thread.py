"""Where a classify's cache math runs: on the encoder thread for a small task whose method is fitted and
when the encoder has nothing else to do (one thread hand-off less), else on the classify pool; a first use
of a method is fitted on the pool, never on the encoder thread. Either way the answer is the same."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from app.service import ClassifyRequest, Task, TaskService, classify_stages
from app.service.queue import EncoderQueue
from app.service.task import MethodFit
from tests.api.test_queue import RecordingEncoder, pixels

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, create_request, created

MINUTE_MS = 60_000.0


class Threads:
    """Records the thread each call of the wrapped function ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.names: list[str] = []
        original = getattr(owner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            self.names.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


def classify(loop: Loop, service: TaskService, task: Task, **options: Any) -> list[Any]:
    probes = cifar_images("test", ("airplane", "automobile"), 2)
    answer = loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(uploads(probes), **options)))
    return [(p.label, p.top_k, p.method) for p in answer.predictions]


def test_a_small_fitted_task_is_predicted_on_the_encoder_thread_with_the_same_answer(
    loop: Loop, service: TaskService, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = created(loop, service, create_request(("airplane", "automobile"), 3))
    assert task.is_fitted()  # the build keeps the task's own method fitted
    predicts = Threads(monkeypatch, classify_stages, "predict")
    inline = classify(loop, service, task, top_k=2, evidence=2)
    assert predicts.take() == ["encoder-queue"]

    monkeypatch.setattr(classify_stages, "INLINE_PREDICT_MAX_BYTES", -1)  # every task too big: the pool predicts
    pooled = classify(loop, service, task, top_k=2, evidence=2)
    (thread,) = predicts.take()
    assert thread.startswith("shotcache-classify")
    assert inline == pooled


def test_a_first_use_of_another_method_is_fitted_on_the_pool_then_predicted_on_the_encoder_thread(
    loop: Loop, service: TaskService, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = created(loop, service, create_request(("airplane", "automobile"), 3))
    other = next(name for name in task.fits if name != task.method)
    assert not task.is_fitted(other)
    fits = Threads(monkeypatch, MethodFit, "fit")
    predicts = Threads(monkeypatch, classify_stages, "predict")

    first = classify(loop, service, task, method=other)
    (fitted_on,) = fits.take()
    (predicted_on,) = predicts.take()
    assert fitted_on.startswith("shotcache-classify")
    assert predicted_on == fitted_on
    assert task.is_fitted(other)

    assert classify(loop, service, task, method=other) == first
    assert (fits.take(), predicts.take()) == ([], ["encoder-queue"])


def test_with_other_encoder_work_announced_the_pool_predicts(
    loop: Loop, service: TaskService, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = created(loop, service, create_request(("airplane", "automobile"), 3))
    predicts = Threads(monkeypatch, classify_stages, "predict")
    monkeypatch.setattr(service.queue, "_max_wait", 0.0)  # the batch does not wait for the announced job below
    service.queue.announce()  # another request is being decoded
    try:
        classify(loop, service, task)
    finally:
        service.queue.withdraw()
    (thread,) = predicts.take()
    assert thread.startswith("shotcache-classify")


def test_the_queue_says_when_a_result_is_not_its_only_work() -> None:
    encoder = RecordingEncoder()
    queue = EncoderQueue(encoder, max_batch=4, max_wait_ms=MINUTE_MS)  # type: ignore[arg-type]
    seen: list[bool] = []

    def record(_: Any) -> None:
        seen.append(queue.has_other_work)

    try:
        two = [queue.submit(pixels(1.0)), queue.submit(pixels(2.0))]  # queued before the worker starts: one batch
        for future in two:
            future.add_done_callback(record)
        queue.start()
        for future in two:
            future.result(timeout=10)
        assert encoder.batches == [2]
        assert seen == [True, True]

        alone = queue.submit(pixels(3.0))
        alone.result(timeout=10)
        alone.add_done_callback(record)  # already done: runs here, with nothing left for the encoder
        assert seen[-1] is False

        queue.announce()
        assert queue.has_other_work  # a job is on its way
        queue.withdraw()
        assert not queue.has_other_work
    finally:
        queue.stop()
    np.testing.assert_array_equal(two[1].result(), np.full((1, 4), 2.0, dtype=np.float32))
