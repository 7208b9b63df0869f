"""Predicts that land on the classify pool together are coalesced: requests asking one task the same way are
predicted in one cache-math call, each getting the answer it would get alone; a group whose call fails is
predicted one by one, and a drain the pool drops at shutdown fails its requests instead of losing them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from app.errors import AppError, ErrorCode
from app.service import ClassifyRequest, Task, TaskService, classify_stages
from app.service.classify_stages import Pending, PredictCoalescer
from app.service.requests import CheckedClassify
from app.service.task import Prediction

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, create_request, created


@pytest.fixture
def task(loop: Loop, service: TaskService) -> Task:
    return created(loop, service, create_request(("airplane", "automobile", "bird"), 3))


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-pool")
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


def features(task: Task, rows: int, seed: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    dim = task.supports.per_shot.keys.shape[1]
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def checked(top_k: int = 2, **options: Any) -> CheckedClassify:
    fields: dict[str, Any] = {"method": None, "abstain": False, "evidence": 0, **options}
    return CheckedClassify(images=(), top_k=top_k, **fields)


def pending(task: Task, rows: int, seed: int, ask: CheckedClassify) -> Pending:
    return Pending(task, ask, features(task, rows, seed), Future())


def held(pool: ThreadPoolExecutor) -> threading.Event:
    """Occupy the pool's one thread until the returned event is set, so what is added meanwhile lands together."""
    release = threading.Event()
    pool.submit(release.wait, 30)
    return release


def same(a: list[Prediction], b: list[Prediction]) -> None:
    assert [p.label for p in a] == [p.label for p in b]
    for x, y in zip(a, b, strict=True):
        assert [name for name, _ in x.top_k] == [name for name, _ in y.top_k]
        np.testing.assert_allclose([p for _, p in x.top_k], [p for _, p in y.top_k], rtol=1e-5, atol=1e-7)


def test_requests_that_land_together_share_one_predict_with_their_own_answers(
    task: Task, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = classify_stages.predict

    def counted(t: Task, f: Any, c: CheckedClassify) -> list[Prediction]:
        calls.append(int(f.shape[0]))
        return original(t, f, c)

    monkeypatch.setattr(classify_stages, "predict", counted)
    coalescer = PredictCoalescer(pool)
    ask, other = checked(top_k=2), checked(top_k=3, evidence=1)
    items = [pending(task, 1, 0, ask), pending(task, 2, 1, ask), pending(task, 1, 2, other), pending(task, 1, 3, ask)]
    release = held(pool)
    for item in items:
        coalescer.add(item)
    release.set()
    answers = [item.answer.result(timeout=30) for item in items]

    assert sorted(calls) == [1, 4]  # one call for the three same-question requests' 4 rows, one for the other
    assert [len(a) for a in answers] == [1, 2, 1, 1]
    for item, answer in zip(items, answers, strict=True):
        same(answer, original(task, item.features, item.checked))
    assert len(answers[2][0].top_k) == 3  # the other question, answered its way
    assert answers[2][0].evidence


def test_a_group_whose_predict_fails_is_predicted_one_by_one(
    task: Task, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = classify_stages.predict

    def one_row_only(t: Task, f: Any, c: CheckedClassify) -> list[Prediction]:
        if f.shape[0] > 1:
            raise RuntimeError("stacked rows refused")
        if float(f[0, 0]) == 0.0:  # this request's own failure reaches it alone
            raise ValueError("a bad row")
        return original(t, f, c)

    monkeypatch.setattr(classify_stages, "predict", one_row_only)
    coalescer = PredictCoalescer(pool)
    ask = checked()
    items = [pending(task, 1, seed, ask) for seed in range(3)]
    items[1].features[0, 0] = 0.0
    release = held(pool)
    for item in items:
        coalescer.add(item)
    release.set()
    for item in (items[0], items[2]):
        same(item.answer.result(timeout=30), original(task, item.features, ask))
    with pytest.raises(ValueError, match="a bad row"):
        items[1].answer.result(timeout=30)


def test_a_drain_dropped_at_shutdown_fails_its_requests(task: Task) -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    coalescer = PredictCoalescer(pool)
    release = held(pool)
    items = [pending(task, 1, seed, checked()) for seed in range(2)]
    for item in items:
        coalescer.add(item)
    pool.shutdown(wait=False, cancel_futures=True)  # the queued drain is cancelled unrun
    release.set()
    for item in items:
        with pytest.raises(AppError) as raised:
            item.answer.result(timeout=30)
        assert raised.value.code == ErrorCode.SHUTTING_DOWN
    late = pending(task, 1, 9, checked())
    coalescer.add(late)  # the pool refuses new work: the request fails at once
    with pytest.raises(RuntimeError):
        late.answer.result(timeout=30)


def test_concurrent_classify_requests_get_the_answers_they_get_alone(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(("airplane", "automobile", "bird"), 3))
    probes = [uploads([path]) for path, _ in cifar_images("test", ("airplane", "automobile", "bird"), 3)]

    def ask(images: list[Any]) -> list[tuple[str | None, list[str]]]:
        answer = loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(images, top_k=3)))
        return [(p.label, [name for name, _ in p.top_k]) for p in answer.predictions]

    alone = [ask(images) for images in probes]
    with ThreadPoolExecutor(max_workers=len(probes)) as clients:
        together = list(clients.map(ask, probes))
    assert together == alone
