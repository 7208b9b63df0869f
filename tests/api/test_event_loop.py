"""The event loop stays free while a long classify computes: a 64-image request on a 1000-class x
16-shot task runs its cache math on a worker thread, so /healthz requests sent while that math is in
progress are answered before the classify answer.

The task's method is gated: its `predict` signals that it started, then waits until the test has sent
its /healthz requests. If `predict` ran on the event loop, no /healthz could be answered while it
waits (the gate gives up after a minute), so the recorded order would put the classify answer first.
The assertion is on the order of answers, not on any duration.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from app.encoder import ClassPrompts
from app.fewshot import make_supports
from app.service import Task
from app.service.build import method_fit
from cache_models import TipAdapter

from .conftest import cifar_images, files_of

CLASSES, SHOTS, QUERIES = 1000, 16, 64
HEALTH_CHECKS = 3


class GatedTipAdapter(TipAdapter):
    started = threading.Event()
    release = threading.Event()

    def predict(self, queries: object, *, top_k: int | None = None) -> Any:
        type(self).started.set()
        type(self).release.wait(timeout=60)
        return super().predict(queries, top_k=top_k)


def big_task(service: Any) -> Task:
    rng = np.random.default_rng(0)
    dim = service.encoder.dim

    def unit(rows: int) -> Any:
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    labels = np.repeat(np.arange(CLASSES, dtype=np.int64), SHOTS)
    supports = make_supports(unit(CLASSES * SHOTS), labels, unit(CLASSES), views=1)
    method = GatedTipAdapter(alpha=1.0, beta=5.5, scale=service.encoder.logit_scale).fit_support(supports.per_shot)
    now = time.time()
    task = Task(
        tenant="public",
        task_id="big-gated",
        name="1000 x 16",
        version=1,
        created_at=now,
        updated_at=now,
        model_id=service.encoder.identity.model_id,
        backend=service.encoder.backend,
        views=1,
        templates=("a photo of a {}.",),
        classes=tuple(ClassPrompts(f"class {i}") for i in range(CLASSES)),
        supports=supports,
        shot_seeds=np.zeros(CLASSES * SHOTS, dtype=np.int64),
        fits={"tip-adapter": method_fit(method)},
        method="tip-adapter",
        method_requested="tip-adapter",
    )
    task.fitted.keep(method)  # the gated instance itself, not a refit of its state
    return task


def test_healthz_answers_while_a_long_classify_computes(api_client: TestClient) -> None:
    service = api_client.app.state.service  # type: ignore[attr-defined]
    task = big_task(service)
    service.registry.save(task)
    images = cifar_images("test", ("cat", "dog"), QUERIES // 2)
    answered: list[str] = []
    lock = threading.Lock()
    outcome: dict[str, Any] = {}

    def classify() -> None:
        outcome["response"] = api_client.post(
            f"/v1/tasks/{task.task_id}/classify", files=files_of(images), data={"top_k": 3}
        )
        with lock:
            answered.append("classify")

    worker = threading.Thread(target=classify)
    try:
        worker.start()
        assert GatedTipAdapter.started.wait(timeout=300), "the classify never reached the cache math"
        for _ in range(HEALTH_CHECKS):
            assert api_client.get("/healthz").status_code == 200
            with lock:
                answered.append("healthz")
    finally:
        GatedTipAdapter.release.set()
        worker.join(timeout=300)
        service.registry.delete(task.key)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == QUERIES
    assert answered == ["healthz"] * HEALTH_CHECKS + ["classify"]
