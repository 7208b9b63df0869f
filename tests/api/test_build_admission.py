"""Task builds are admitted up to SHOTCACHE_MAX_PENDING_BUILDS; past it a create or add-shots answers
429 with Retry-After instead of queueing uploads in memory without bound."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from .conftest import Shot, assert_error, files_of, labels_of, running_app


def test_builds_past_the_limit_get_429_and_the_slot_frees_again(
    make_settings: Callable[..., Any], base_shots: list[Shot]
) -> None:
    shots = base_shots[:3] + base_shots[6:9]  # two classes
    with running_app(make_settings(max_pending_builds=1)) as client:
        admission = client.app.state.service.admission  # type: ignore[attr-defined]
        with admission.build():  # one build in flight: the only slot is taken
            response = _create(client, shots)
            assert_error(response, 429, "busy", "task builds")
            assert response.headers["Retry-After"] == "5"
            response = client.post(
                "/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots), "wait": "false"}
            )
            assert_error(response, 429, "busy")
        created = _create(client, shots)
        assert created.status_code == 201, created.text
        task_id = created.json()["id"]
        with admission.build():
            more = client.post(
                f"/v1/tasks/{task_id}/shots", files=files_of(shots[:2]), data={"labels": labels_of(shots[:2])}
            )
            assert_error(more, 429, "busy")
        assert admission.pending_builds == 0  # every admitted build was released


def _create(client: TestClient, shots: list[Shot]) -> Any:
    return client.post("/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots)})
