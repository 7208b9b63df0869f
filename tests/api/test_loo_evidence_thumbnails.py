"""What the page needs from the API (issue 13): per-class leave-one-out and its confusion matrix in the
task resource, the nearest shots as evidence per prediction, and a tenant-scoped thumbnail per shot that
survives a restart and goes with the task."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from .conftest import (
    BASE_CLASSES,
    BASE_SHOTS,
    Shot,
    assert_error,
    cifar_images,
    classify,
    create_task,
    files_of,
    running_app,
)

ALICE = {"Authorization": "Bearer alice-key-0001"}
BOB = {"Authorization": "Bearer bob-key-00002"}


def _dense(task: dict[str, Any]) -> list[list[int]]:
    names = [c["name"] for c in task["classes"]]
    matrix = [[0] * len(names) for _ in names]
    for cell in task["loo"]["confusion"]:
        assert cell["count"] > 0, cell  # only the non-zero cells are listed
        matrix[names.index(cell["actual"])][names.index(cell["predicted"])] = cell["count"]
    return matrix


def test_task_reports_leave_one_out_per_class_and_confusion(base_task: dict[str, Any]) -> None:
    loo = base_task["loo"]
    assert loo["method"] == base_task["method"]
    assert [c["name"] for c in loo["classes"]] == list(BASE_CLASSES)
    matrix = _dense(base_task)
    scored = base_task["methods"][base_task["method"]]["loo_scored_shots"]
    assert sum(map(sum, matrix)) == scored == len(BASE_CLASSES) * BASE_SHOTS
    for i, row in enumerate(loo["classes"]):
        assert row["scored"] == sum(matrix[i]) == BASE_SHOTS
        assert row["correct"] == matrix[i][i]
        assert row["accuracy"] == row["correct"] / row["scored"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / scored == base_task["loo_accuracy"]


def test_one_shot_per_class_has_no_leave_one_out(api_client: TestClient) -> None:
    task = create_task(api_client, cifar_images("train", ("cat", "ship"), 1, skip=20))
    assert task["loo"] == {
        "method": task["method"],
        "classes": [{"name": n, "scored": 0, "correct": 0, "accuracy": None} for n in ("cat", "ship")],
        "confusion": [],
    }


def test_evidence_is_the_nearest_shots(
    api_client: TestClient, base_task: dict[str, Any], base_shots: list[Shot]
) -> None:
    probes = cifar_images("test", BASE_CLASSES, 1)
    answer = classify(api_client, base_task["id"], probes, evidence=4, top_k=2)
    for result in answer["results"]:
        evidence = result["evidence"]
        assert len(evidence) == 4
        shots = [e["shot"] for e in evidence]
        assert len(set(shots)) == 4
        assert all(0 <= s < len(base_shots) for s in shots)
        # Shot ids are the upload order; the label is that shot's class.
        assert [e["label"] for e in evidence] == [base_shots[s][1] for s in shots]
        sims = [e["similarity"] for e in evidence]
        assert sims == sorted(sims, reverse=True)
        assert all(-1.0 <= s <= 1.0 + 1e-5 for s in sims)
    # A query that is one of the shots finds itself first, at cosine 1.
    itself = classify(api_client, base_task["id"], base_shots[7:8], evidence=1)["results"][0]["evidence"]
    assert itself[0]["shot"] == 7
    assert abs(itself[0]["similarity"] - 1.0) < 1e-4
    # Not asked for: not computed.
    assert classify(api_client, base_task["id"], probes[:1])["results"][0]["evidence"] is None


def test_evidence_bounds(api_client: TestClient, base_task: dict[str, Any]) -> None:
    probe = files_of(cifar_images("test", BASE_CLASSES[:1], 1))
    url = f"/v1/tasks/{base_task['id']}/classify"
    for bad in ("-1", "1000", "many"):
        response = api_client.post(url, files=probe, data={"evidence": bad})
        assert_error(response, 422, None, "evidence")
    answer = api_client.post(url, files=probe, data={"evidence": "0"})
    assert answer.status_code == 200
    assert answer.json()["results"][0]["evidence"] is None
    everything = api_client.post(url, files=probe, data={"evidence": "100"}).json()
    assert len(everything["results"][0]["evidence"]) == len(BASE_CLASSES) * BASE_SHOTS  # capped at the shots


def _jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def test_thumbnails_are_tenant_scoped_persist_and_go_with_the_task(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(api_keys=["alice:alice-key-0001", "bob:bob-key-00002"])
    shots = cifar_images("train", ("dog", "truck"), 2, skip=5)
    with running_app(settings) as client:
        task = create_task(client, shots, headers=ALICE)
        url = f"/v1/tasks/{task['id']}/shots"
        first = client.get(f"{url}/0/thumbnail", headers=ALICE)
        assert first.status_code == 200
        assert first.headers["content-type"] == "image/jpeg"
        assert _jpeg(first.content).size == (32, 32)  # cifar images are 32 px: never enlarged
        assert_error(client.get(f"{url}/4/thumbnail", headers=ALICE), 404, "shot_not_found", "4")
        assert_error(client.get(f"{url}/0/thumbnail", headers=BOB), 404, "task_not_found")
        assert_error(client.get(f"{url}/0/thumbnail"), 401, "unauthorized")
        grown = client.post(
            url, files=files_of(shots[:1]), data={"labels": ["cat"]}, headers=ALICE
        )  # a new class, shot 4
        assert grown.status_code == 200, grown.text
        added = client.get(f"{url}/4/thumbnail", headers=ALICE)
        assert added.status_code == 200
        assert added.content == first.content  # the same picture, made from the same upload
    with running_app(make_settings(data_dir=settings.data_dir, api_keys=settings.api_keys)) as client:
        again = client.get(f"{url}/0/thumbnail", headers=ALICE)
        assert again.content == first.content
        restored = client.get(f"/v1/tasks/{task['id']}", headers=ALICE).json()
        assert restored["loo"] == grown.json()["loo"]
        assert client.delete(f"/v1/tasks/{task['id']}", headers=ALICE).status_code == 204
        assert_error(client.get(f"{url}/0/thumbnail", headers=ALICE), 404, "task_not_found")


def test_large_images_make_small_thumbnails(api_client: TestClient) -> None:
    def photo(color: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (900, 600), color).save(out, format="JPEG")
        return out.getvalue()

    files = [("images", (f"{i}.jpg", photo((40 * i, 90, 200 - 40 * i)), "image/jpeg")) for i in range(4)]
    response = api_client.post("/v1/tasks", files=files, data={"labels": ["a", "a", "b", "b"]})
    assert response.status_code == 201, response.text
    thumb = api_client.get(f"/v1/tasks/{response.json()['id']}/shots/2/thumbnail")
    assert _jpeg(thumb.content).size == (160, 107)
    assert len(thumb.content) < 8_000
