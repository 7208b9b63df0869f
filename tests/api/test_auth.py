"""API keys per tenant (issue 6): /v1 needs a bearer key, tenants see only their own tasks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .conftest import assert_error, cifar_images, classify, create_task, files_of, running_app

ALICE = {"Authorization": "Bearer alice-key-0001"}
BOB = {"Authorization": "Bearer bob-key-00002"}
ADMIN = {"Authorization": "Bearer admin-key-0003"}


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Any]) -> Iterator[TestClient]:
    settings = make_settings(api_keys=["alice:alice-key-0001", "bob:bob-key-00002"], admin_keys=["admin-key-0003"])
    with running_app(settings) as client:
        yield client


@pytest.fixture(scope="module")
def shots() -> list[Any]:
    return cifar_images("train", ("cat", "dog"), 2)


@pytest.fixture(scope="module")
def alice_task(client: TestClient, shots: list[Any]) -> dict[str, Any]:
    return create_task(client, shots, headers=ALICE, name="alice's")


def test_v1_needs_a_known_key(client: TestClient, shots: list[Any], alice_task: dict[str, Any]) -> None:
    image = files_of(shots[:1])
    requests = [
        ("GET", "/v1/tasks", {}),
        ("GET", "/v1/info", {}),
        ("GET", f"/v1/tasks/{alice_task['id']}", {}),
        ("DELETE", f"/v1/tasks/{alice_task['id']}", {}),
        ("POST", "/v1/tasks", {"files": files_of(shots), "data": {"labels": ["cat", "cat", "dog", "dog"]}}),
        ("POST", "/v1/tasks", {"data": {"labels": ["cat"]}}),  # a bad form too: 401 first, no validation details
        ("POST", f"/v1/tasks/{alice_task['id']}/classify", {"files": image}),
        ("POST", f"/v1/tasks/{alice_task['id']}/shots", {"files": image, "data": {"labels": ["cat"]}}),
        ("GET", "/v1/admin/usage", {}),
    ]
    for method, url, kwargs in requests:
        for headers, what in (
            ({}, "missing"),
            ({"Authorization": "Bearer not-a-key-at-all"}, "unknown"),
            ({"Authorization": "Bearer "}, "missing"),
            ({"Authorization": "Basic YWxpY2U6YWxpY2Uta2V5LTAwMDE="}, "missing"),
            ({"Authorization": "alice-key-0001"}, "missing"),
        ):
            response = client.request(method, url, headers=headers, **kwargs)
            assert_error(response, 401, "unauthorized", what)
            assert response.headers.get("www-authenticate", "").lower().startswith("bearer"), (method, url)
    raw_path = f"/v1/tasks/{alice_task['id']}/classify"
    for headers, what in (({}, "missing"), ({"Authorization": "Bearer not-a-key-at-all"}, "unknown")):
        response = client.post(
            raw_path, content=shots[0][0].read_bytes(), headers={"Content-Type": "image/jpeg", **headers}
        )
        assert_error(response, 401, "unauthorized", what)  # the raw-body route, outside FastAPI's dependencies
    # Nothing above changed anything.
    assert client.get(f"/v1/tasks/{alice_task['id']}", headers=ALICE).json() == alice_task
    assert [t["id"] for t in client.get("/v1/tasks", headers=ALICE).json()["tasks"]] == [alice_task["id"]]


def test_health_stays_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_tenants_are_isolated(client: TestClient, shots: list[Any], alice_task: dict[str, Any]) -> None:
    bob_task = create_task(client, shots, headers=BOB, name="bob's")
    task_id = alice_task["id"]
    image = files_of(shots[:1])

    # Bob cannot see, classify, extend or delete Alice's task: to him it does not exist.
    assert_error(client.get(f"/v1/tasks/{task_id}", headers=BOB), 404, "task_not_found")
    assert_error(client.post(f"/v1/tasks/{task_id}/classify", files=image, headers=BOB), 404, "task_not_found")
    raw = {"Content-Type": "image/jpeg", **BOB}
    response = client.post(f"/v1/tasks/{task_id}/classify", content=shots[0][0].read_bytes(), headers=raw)
    assert_error(response, 404, "task_not_found")
    assert_error(
        client.post(f"/v1/tasks/{task_id}/shots", files=image, data={"labels": ["cat"]}, headers=BOB),
        404,
        "task_not_found",
    )
    assert_error(client.delete(f"/v1/tasks/{task_id}", headers=BOB), 404, "task_not_found")
    # Nor can the admin key through the tenant routes.
    assert_error(client.get(f"/v1/tasks/{task_id}", headers=ADMIN), 404, "task_not_found")

    # Each lists exactly their own.
    assert [t["id"] for t in client.get("/v1/tasks", headers=ALICE).json()["tasks"]] == [task_id]
    assert [t["id"] for t in client.get("/v1/tasks", headers=BOB).json()["tasks"]] == [bob_task["id"]]
    assert client.get("/v1/info", headers=ALICE).json()["tasks"] == 1
    assert client.get("/v1/info", headers=ALICE).json()["auth"] == "api-keys"

    # Alice's task is untouched and still hers.
    assert client.get(f"/v1/tasks/{task_id}", headers=ALICE).json() == alice_task
    assert classify(client, task_id, shots[:1], headers=ALICE)["task_version"] == 1
    assert client.delete(f"/v1/tasks/{bob_task['id']}", headers=BOB).status_code == 204
    assert client.get(f"/v1/tasks/{task_id}", headers=ALICE).status_code == 200


def test_admin_usage(client: TestClient, alice_task: dict[str, Any]) -> None:
    response = client.get("/v1/admin/usage", headers=ADMIN)
    assert response.status_code == 200, response.text
    tenants = response.json()["tenants"]
    assert tenants["alice"]["tasks"] == len(client.get("/v1/tasks", headers=ALICE).json()["tasks"])
    assert tenants["alice"]["bytes"] > 0
    for headers in (ALICE, BOB):
        assert_error(client.get("/v1/admin/usage", headers=headers), 403, "forbidden", "admin")
