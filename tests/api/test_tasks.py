"""Task lifecycle over HTTP: list, get, delete, add shots (no re-encoding), async builds; and the
service endpoints (/healthz, /readyz, /v1/info, /metrics)."""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from tests.app import hostile_images

from .conftest import accuracy, assert_error, cifar_images, classify, create_task, files_of, labels_of, raw_files

THREE = ("airplane", "automobile", "bird")


def encoded_images() -> float:
    """Images the encoder queue has encoded so far, in this process (all apps)."""
    return REGISTRY.get_sample_value("shotcache_encode_batch_images_sum") or 0.0


def test_get_list_delete(api_client: TestClient) -> None:
    shots = cifar_images("train", ("cat", "dog"), 3)
    task = create_task(api_client, shots, name="to delete")
    task_id = task["id"]
    service = api_client.app.state.service  # type: ignore[attr-defined]

    assert api_client.get(f"/v1/tasks/{task_id}").json() == task
    listed = api_client.get("/v1/tasks").json()
    assert task_id in [t["id"] for t in listed["tasks"]]
    assert next(t for t in listed["tasks"] if t["id"] == task_id) == task
    assert service.store.load("public", task_id) is not None

    response = api_client.delete(f"/v1/tasks/{task_id}")
    assert response.status_code == 204
    assert response.content == b""

    assert_error(api_client.get(f"/v1/tasks/{task_id}"), 404, "task_not_found", task_id)
    assert_error(
        api_client.post(f"/v1/tasks/{task_id}/classify", files=files_of(shots[:1])), 404, "task_not_found", task_id
    )
    assert_error(
        api_client.post(f"/v1/tasks/{task_id}/shots", files=files_of(shots[:1]), data={"labels": ["cat"]}),
        404,
        "task_not_found",
    )
    assert_error(api_client.delete(f"/v1/tasks/{task_id}"), 404, "task_not_found", task_id)
    assert task_id not in [t["id"] for t in api_client.get("/v1/tasks").json()["tasks"]]
    assert service.store.load("public", task_id) is None  # gone from disk too


def test_add_shots_and_a_new_class(api_client: TestClient) -> None:
    shots = cifar_images("train", THREE, 4)
    task = create_task(api_client, shots)
    task_id = task["id"]
    service = api_client.app.state.service  # type: ignore[attr-defined]
    before = service.registry.get(("public", task_id)).shot_features.copy()
    assert before.shape[0] == len(shots)

    added = cifar_images("train", ("airplane",), 2, skip=4) + cifar_images("train", ("ship",), 4)
    encoded = encoded_images()
    response = api_client.post(
        f"/v1/tasks/{task_id}/shots",
        files=files_of(added),
        data={"labels": labels_of(added), "classes": '{"ship": ["a photo of a ship at sea"]}'},
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    # Only the six new images went through the encoder; the old shots' features are kept bit for bit.
    assert encoded_images() - encoded == len(added)
    after = service.registry.get(("public", task_id)).shot_features
    assert after.shape[0] == len(shots) + len(added)
    assert np.array_equal(after[: len(shots)], before)
    stored = service.store.load("public", task_id)
    assert stored.version == 2
    assert np.array_equal(stored.arrays["shot_features"][: len(shots)], before)

    assert updated["id"] == task_id
    assert updated["version"] == 2
    assert updated["updated_at"] >= task["updated_at"]
    assert updated["created_at"] == task["created_at"]
    assert [(c["name"], c["shots"]) for c in updated["classes"]] == [
        ("airplane", 6),
        ("automobile", 4),
        ("bird", 4),
        ("ship", 4),
    ]
    assert updated["classes"][3]["prompts"] == ["a photo of a ship at sea"]
    assert set(updated["methods"]) == set(task["methods"])  # re-tuned on all shots
    assert updated["methods"][updated["method"]]["loo_scored_shots"] == len(shots) + len(added)
    assert api_client.get(f"/v1/tasks/{task_id}").json() == updated

    # The new class is served. Measured: 8 of these 10 ship test images are labelled ship (chance 1/4).
    ships = cifar_images("test", ("ship",), 10)
    answer = classify(api_client, task_id, ships, top_k=10)
    assert answer["task_version"] == 2
    assert all({e["label"] for e in r["top_k"]} == {*THREE, "ship"} for r in answer["results"])
    assert accuracy(answer, ships) >= 0.5


def test_add_shots_with_a_bad_image_changes_nothing(api_client: TestClient) -> None:
    shots = cifar_images("train", ("cat", "dog"), 3)
    task = create_task(api_client, shots)
    extra = cifar_images("train", ("cat",), 1, skip=3)
    bad = hostile_images.truncated_jpeg()
    response = api_client.post(
        f"/v1/tasks/{task['id']}/shots",
        files=files_of(extra) + raw_files((bad.name, bad.data)),
        data={"labels": ["cat", "horse"]},
    )
    assert_error(response, 422, "corrupt_image", bad.name)
    assert api_client.get(f"/v1/tasks/{task['id']}").json() == task


def test_add_shots_cannot_redefine_an_existing_class(api_client: TestClient, base_task: dict[str, Any]) -> None:
    extra = cifar_images("train", ("cat",), 1, skip=10)
    response = api_client.post(
        f"/v1/tasks/{base_task['id']}/shots",
        files=files_of(extra),
        data={"labels": ["cat"], "classes": '{"cat": ["a small cat"]}'},
    )
    assert_error(response, 422, None, "cat", "already")
    assert api_client.get(f"/v1/tasks/{base_task['id']}").json()["version"] == 1


def test_async_build_reports_progress_then_the_task(api_client: TestClient) -> None:
    shots = cifar_images("train", THREE, 4)
    # 12 shots x 4 views: 48 encodes, seconds on 2 cores, so the build is seen in progress.
    response = api_client.post(
        "/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots), "views": 4, "wait": "false"}
    )
    assert response.status_code == 202, response.text
    build = response.json()
    task_id = build["id"]
    assert build["status"] == "building"
    assert build["total"] == len(shots)
    assert 0 <= build["done"] <= build["total"]
    assert response.headers["location"] == f"/v1/tasks/{task_id}"

    first = api_client.get(f"/v1/tasks/{task_id}")
    assert first.status_code == 202, first.text
    assert first.json()["status"] == "building"
    assert task_id in [b["id"] for b in api_client.get("/v1/tasks").json()["building"]]
    assert_error(api_client.post(f"/v1/tasks/{task_id}/classify", files=files_of(shots[:1])), 409, "building")

    done_seen = [first.json()["done"]]
    deadline = time.monotonic() + 120
    while True:
        current = api_client.get(f"/v1/tasks/{task_id}")
        if current.status_code != 202:
            break
        assert current.json()["status"] == "building"
        done_seen.append(current.json()["done"])
        assert time.monotonic() < deadline, "async build did not finish in 120 s"
        time.sleep(0.2)
    assert current.status_code == 200, current.text
    assert done_seen == sorted(done_seen)  # progress never goes back
    task = current.json()
    assert task["id"] == task_id
    assert task["status"] == "ready"
    assert task["views"] == 4
    assert [(c["name"], c["shots"]) for c in task["classes"]] == [(c, 4) for c in THREE]
    assert task_id not in [b["id"] for b in api_client.get("/v1/tasks").json()["building"]]
    assert classify(api_client, task_id, shots[:1])["task_version"] == 1


def test_failed_async_build_reports_the_error(api_client: TestClient) -> None:
    shots = cifar_images("train", ("cat", "dog"), 2)
    bad = hostile_images.truncated_jpeg()
    response = api_client.post(
        "/v1/tasks",
        files=files_of(shots) + raw_files((bad.name, bad.data)),
        data={"labels": [*labels_of(shots), "dog"], "wait": "false"},
    )
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while (current := api_client.get(f"/v1/tasks/{task_id}")).status_code == 202:
        assert time.monotonic() < deadline, "a failed build still answers 202 (building) after 60 s"
        time.sleep(0.1)
    # The build's own error, with its status: a client polling "while 202" stops.
    assert current.status_code == 422, current.text
    body = current.json()
    assert body["id"] == task_id
    assert body["status"] == "failed"
    assert body["error"]["code"] == "corrupt_image"
    assert bad.name in body["error"]["message"]
    assert api_client.delete(f"/v1/tasks/{task_id}").status_code == 204
    assert_error(api_client.get(f"/v1/tasks/{task_id}"), 404, "task_not_found")


def test_health_and_info(api_client: TestClient, base_task: dict[str, Any]) -> None:
    assert api_client.get("/healthz").json() == {"status": "ok"}
    ready = api_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    info = api_client.get("/v1/info").json()
    assert info["model"]["model_id"] == base_task["model"]
    assert info["model"]["standin"] is True
    assert set(info["methods"]) == {"auto", "zero-shot", "tip-adapter", "tip-x", "ape", "gda", "proker"}
    assert info["default_method"] in info["methods"]
    settings = api_client.app.state.settings  # type: ignore[attr-defined]
    for key in (
        "max_request_mb",
        "max_file_mb",
        "max_create_files",
        "max_classify_files",
        "max_top_k",
        "min_image_side",
    ):
        assert info["limits"][key] == getattr(settings, key)
    assert info["auth"] == "open"
    assert info["tasks"] == len(api_client.get("/v1/tasks").json()["tasks"])
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])


def test_metrics(api_client: TestClient, base_task: dict[str, Any]) -> None:
    task_id = base_task["id"]
    classify(api_client, task_id, cifar_images("test", ("cat",), 1))
    # Create and delete a task on this app so the tasks gauge reflects it (the registry is per process).
    doomed = create_task(api_client, cifar_images("train", ("cat", "dog"), 2))
    assert api_client.delete(f"/v1/tasks/{doomed['id']}").status_code == 204
    response = api_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    match = re.search(
        r'^shotcache_http_requests_total\{method="POST",route="/v1/tasks/\{task_id\}/classify",status="200"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert match
    assert float(match.group(1)) >= 1
    assert re.search(
        r'^shotcache_http_requests_total\{method="DELETE",route="/v1/tasks/\{task_id\}",status="204"\} ',
        text,
        re.MULTILINE,
    )
    assert task_id not in text
    assert doomed["id"] not in text
    assert re.search(r"^shotcache_http_request_seconds_bucket\{", text, re.MULTILINE)
    encodes = re.search(r"^shotcache_encode_seconds_count (\S+)$", text, re.MULTILINE)
    assert encodes
    assert float(encodes.group(1)) >= 1
    tasks = re.search(r"^shotcache_tasks (\S+)$", text, re.MULTILINE)
    assert tasks
    assert float(tasks.group(1)) == len(api_client.get("/v1/tasks").json()["tasks"])


def test_the_create_forms_method_field_names_every_method(api_client: TestClient) -> None:
    """The form's documentation is built from the service's method list (ProKeR was once left out of it)."""
    schema = api_client.get("/openapi.json").json()
    ref = schema["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    described = form["properties"]["method"]["description"]
    for method in api_client.get("/v1/info").json()["methods"]:
        assert method in described


def test_patch_switches_the_method_and_renames_without_uploading(api_client: TestClient) -> None:
    shots = cifar_images("train", ("cat", "dog"), 3)
    task = create_task(api_client, shots, name="pets", method="ape")
    assert (task["method"], task["selection"]) == ("ape", None)
    url = f"/v1/tasks/{task['id']}"
    before = encoded_images()
    response = api_client.patch(url, json={"method": "auto"})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert encoded_images() == before  # nothing re-encoded
    assert (updated["version"], updated["method_requested"], updated["name"]) == (task["version"] + 1, "auto", "pets")
    assert updated["method"] == "ensemble"
    assert updated["selection"]["rule"] == "blend"
    assert updated["classes"] == task["classes"]
    assert api_client.get(url).json() == updated
    probe = files_of(cifar_images("test", ("cat",), 1))
    assert {r["method"] for r in api_client.post(f"{url}/classify", files=probe).json()["results"]} == {"ensemble"}

    renamed = api_client.patch(url, json={"name": "animals"}).json()
    assert (renamed["name"], renamed["method"], renamed["version"]) == ("animals", "ensemble", updated["version"] + 1)
    assert renamed["selection"] == updated["selection"]
    assert api_client.patch(url, json={"name": None}).json()["name"] is None


def test_patch_errors(api_client: TestClient, base_task: dict[str, Any]) -> None:
    url = f"/v1/tasks/{base_task['id']}"
    assert_error(api_client.patch(url, json={}), 422, "invalid_request", "nothing to change")
    assert_error(api_client.patch(url, json={"method": "magic"}), 422, "unknown_method", "magic", "tip-adapter")
    assert_error(api_client.patch(url, json={"methd": "ape"}), 422, "invalid_request", "methd")
    assert_error(api_client.patch(url, json={"method": 3}), 422, "invalid_request", "method")
    assert_error(api_client.patch(url, json={"name": "x" * 1000}), 422, "name_too_long")
    broken = api_client.patch(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(broken, 422, "invalid_json", "not valid JSON", "character 1")
    assert_error(api_client.patch("/v1/tasks/nope", json={"method": "ape"}), 404, "task_not_found", "nope")
    assert api_client.get(url).json() == base_task  # nothing changed
