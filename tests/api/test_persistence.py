"""Restart the app on the same data dir: the same tasks, the same answers; a damaged task is reported
and skipped, never a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .conftest import cifar_images, classify, create_task, files_of, labels_of, running_app

TOLERANCE = 1e-6


def assert_same_answers(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert (a["task_id"], a["task_version"], a["model"]) == (b["task_id"], b["task_version"], b["model"])
    for x, y in zip(a["results"], b["results"], strict=True):
        assert (x["label"], x["method"], x["filename"]) == (y["label"], y["method"], y["filename"])
        assert [e["label"] for e in x["top_k"]] == [e["label"] for e in y["top_k"]]
        for e, f in zip(x["top_k"], y["top_k"], strict=True):
            assert e["probability"] == pytest.approx(f["probability"], abs=TOLERANCE)


def answers(client: TestClient, tasks: dict[str, dict[str, Any]], probes: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, task in tasks.items():
        out[key] = classify(client, task["id"], probes, top_k=10)
        out[key + "/zero-shot"] = classify(client, task["id"], probes, top_k=10, method="zero-shot")
        out[key + "/abstain"] = classify(client, task["id"], probes, top_k=10, abstain="true")
    return out


def test_restart_restores_tasks_and_answers(make_settings: Callable[..., Any]) -> None:
    settings = make_settings()
    probes = cifar_images("test", ("airplane", "bird", "cat", "ship"), 2)
    with running_app(settings) as client:
        plain = create_task(client, cifar_images("train", ("airplane", "bird", "cat"), 3), name="plain")
        custom = create_task(
            client,
            cifar_images("train", ("bird", "cat"), 3),
            method="gda",
            views=2,
            templates='["a blurry photo of a {}.", "a photo of the {}."]',
            classes='{"cat": {"prompts": ["a small domestic feline"], "templates": false}}',
        )
        doomed = create_task(client, cifar_images("train", ("dog", "frog"), 2))
        added = cifar_images("train", ("ship",), 3)
        response = client.post(
            f"/v1/tasks/{plain['id']}/shots", files=files_of(added), data={"labels": labels_of(added)}
        )
        assert response.status_code == 200, response.text
        assert client.delete(f"/v1/tasks/{doomed['id']}").status_code == 204
        tasks = {"plain": client.get(f"/v1/tasks/{plain['id']}").json(), "custom": custom}
        assert tasks["plain"]["version"] == 2
        listed = client.get("/v1/tasks").json()["tasks"]
        before = answers(client, tasks, probes)

    with running_app(make_settings(data_dir=settings.data_dir)) as client:
        assert client.get("/v1/tasks").json()["tasks"] == listed
        for task in tasks.values():
            assert client.get(f"/v1/tasks/{task['id']}").json() == task
        assert client.get(f"/v1/tasks/{doomed['id']}").status_code == 404
        after = answers(client, tasks, probes)
        assert after.keys() == before.keys()
        for key in before:
            assert_same_answers(before[key], after[key])
        assert client.get("/v1/info").json()["damaged_tasks"] == []

        # The restored task keeps working: one more version on top of the restored one.
        more = cifar_images("train", ("cat",), 1, skip=3)
        response = client.post(
            f"/v1/tasks/{custom['id']}/shots", files=files_of(more), data={"labels": labels_of(more)}
        )
        assert response.status_code == 200, response.text
        assert response.json()["version"] == 2
        assert [c["shots"] for c in response.json()["classes"]] == [3, 4]
        assert response.json()["classes"][1]["prompts"] == ["a small domestic feline"]
        extended = response.json()

    with running_app(make_settings(data_dir=settings.data_dir)) as client:
        assert client.get(f"/v1/tasks/{custom['id']}").json() == extended


def test_damaged_task_is_reported_and_skipped(make_settings: Callable[..., Any]) -> None:
    settings = make_settings()
    probes = cifar_images("test", ("dog", "frog"), 2)
    with running_app(settings) as client:
        good = create_task(client, cifar_images("train", ("dog", "frog"), 3))
        bad = create_task(client, cifar_images("train", ("dog", "frog"), 2, skip=3))
        reference = classify(client, good["id"], probes, top_k=10)

    # Flip bytes in one stored array of the second task (a disk error, a bad copy...).
    task_dir = Path(settings.data_dir) / "tasks" / "public" / bad["id"]
    manifest = json.loads((task_dir / "current.json").read_text())
    arrays = sorted(task_dir.glob("v*/a*.npy"))
    assert arrays, manifest
    data = bytearray(arrays[0].read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    arrays[0].write_bytes(bytes(data))

    with running_app(make_settings(data_dir=settings.data_dir)) as client:
        assert client.get("/readyz").status_code == 200
        assert [t["id"] for t in client.get("/v1/tasks").json()["tasks"]] == [good["id"]]
        damaged = client.get("/v1/info").json()["damaged_tasks"]
        assert [d["task_id"] for d in damaged] == [bad["id"]]
        assert damaged[0]["reason"]
        response = client.get(f"/v1/tasks/{bad['id']}")
        assert response.status_code == 404
        assert_same_answers(reference, classify(client, good["id"], probes, top_k=10))
