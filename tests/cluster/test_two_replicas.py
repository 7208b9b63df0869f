"""Two real `shotcache serve` replicas (separate processes and data dirs) on one PostgreSQL store:
whatever one acknowledges, the other's next request sees; nothing is lost or half-seen."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.postgres_server import PostgresServer, new_schema_url
from benchmarks.server_process import request_failures
from tests.cluster.replicas import Replica, images, multipart, start_replicas
from tests.conftest import dataset_dir

pytestmark = pytest.mark.slow

BASE = ("airplane", "automobile", "bird")
TOLERANCE = 1e-6


def shots(classes: tuple[str, ...], per_class: int, *, split: str = "train", skip: int = 0) -> list[tuple[Path, str]]:
    root = dataset_dir("cifar10-mini") / split
    out = []
    for name in classes:
        paths = sorted((root / name).glob("*.jpg"))[skip : skip + per_class]
        assert len(paths) == per_class
        out.extend((path, name) for path in paths)
    return out


# An orchestrator's readiness probe gives up after a few seconds; /readyz must answer within that, in an
# outage and while the database comes back (the store's bound on a readiness ping is 1 s).
PROBE_TIMEOUT_S = 3.0


def readiness(base_url: str) -> int:
    """/readyz's status; a probe that gets no answer within PROBE_TIMEOUT_S fails the test."""
    try:
        return httpx.get(f"{base_url}/readyz", timeout=PROBE_TIMEOUT_S).status_code
    except httpx.TimeoutException:
        pytest.fail(f"/readyz of {base_url} did not answer within {PROBE_TIMEOUT_S} s")


def probes() -> list[Path]:
    return [path for path, _ in shots(("airplane", "bird", "cat", "ship"), 2, split="test")]


@pytest.fixture(scope="module")
def cluster(
    postgres: PostgresServer, model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    root = tmp_path_factory.mktemp("cluster")
    a, b = start_replicas(["a", "b"], root, new_schema_url(postgres, "cluster"), model_data_dir)
    yield a, b
    for replica in (a, b):
        replica.stop()
    for replica in (a, b):
        assert request_failures(replica.log_path.read_text(errors="replace")) == [], replica.log_tail()


def create(replica: Replica, classes: tuple[str, ...] = BASE, per_class: int = 3, **form: Any) -> dict[str, Any]:
    with replica.client() as client:
        response = client.post("/v1/tasks", **multipart(shots(classes, per_class), **form))
    assert response.status_code == 201, response.text
    return dict(response.json())


def classify(replica: Replica, task_id: str) -> dict[str, Any]:
    with replica.client() as client:
        response = client.post(f"/v1/tasks/{task_id}/classify", files=images(probes()), data={"top_k": 3})
    assert response.status_code == 200, response.text
    return dict(response.json())


def add_shots(replica: Replica, task_id: str, classes: tuple[str, ...], skip: int = 3) -> httpx.Response:
    with replica.client() as client:
        return client.post(f"/v1/tasks/{task_id}/shots", **multipart(shots(classes, 2, skip=skip)))


def get(replica: Replica, task_id: str) -> httpx.Response:
    with replica.client() as client:
        return client.get(f"/v1/tasks/{task_id}")


def assert_same_answers(x: dict[str, Any], y: dict[str, Any]) -> None:
    assert (x["task_id"], x["task_version"], x["model"]) == (y["task_id"], y["task_version"], y["model"])
    for one, other in zip(x["results"], y["results"], strict=True):
        assert (one["label"], one["method"]) == (other["label"], other["method"])
        assert [e["label"] for e in one["top_k"]] == [e["label"] for e in other["top_k"]]
        for e, f in zip(one["top_k"], other["top_k"], strict=True):
            assert e["probability"] == pytest.approx(f["probability"], abs=TOLERANCE)


def shot_counts(task: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["shots"] for c in task["classes"]}


def test_a_task_created_on_one_replica_answers_identically_on_the_other(cluster: tuple[Replica, Replica]) -> None:
    a, b = cluster
    task = create(a)
    assert get(b, task["id"]).json()["version"] == task["version"] == 1
    assert_same_answers(classify(a, task["id"]), classify(b, task["id"]))


def test_shots_added_on_one_replica_are_seen_by_the_next_request_on_the_other(
    cluster: tuple[Replica, Replica],
) -> None:
    a, b = cluster
    task = create(a)
    classify(a, task["id"])  # A holds version 1 in its cache
    response = add_shots(b, task["id"], ("airplane", "cat"))
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    seen = get(a, task["id"]).json()
    assert seen["version"] == 2
    assert shot_counts(seen) == {"airplane": 5, "automobile": 3, "bird": 3, "cat": 2}
    answer = classify(a, task["id"])
    assert answer["task_version"] == 2
    assert_same_answers(answer, classify(b, task["id"]))


def test_a_method_switched_on_one_replica_serves_on_the_other(cluster: tuple[Replica, Replica]) -> None:
    a, b = cluster
    task = create(a, method="ape")
    assert classify(b, task["id"])["results"][0]["method"] == "ape"  # B holds version 1 in its cache
    with a.client() as client:
        response = client.patch(f"/v1/tasks/{task['id']}", json={"method": "auto", "name": "switched"})
    assert response.status_code == 200, response.text
    switched = response.json()
    assert (switched["version"], switched["method"], switched["name"]) == (2, "ensemble", "switched")
    seen = get(b, task["id"]).json()
    assert (seen["version"], seen["method"], seen["selection"]) == (2, "ensemble", switched["selection"])
    answer = classify(b, task["id"])
    assert (answer["task_version"], answer["results"][0]["method"]) == (2, "ensemble")
    assert_same_answers(answer, classify(a, task["id"]))


def test_a_task_deleted_on_one_replica_is_gone_on_the_other(cluster: tuple[Replica, Replica]) -> None:
    a, b = cluster
    task = create(a)
    classify(b, task["id"])  # B holds it in its cache
    with a.client() as client:
        assert client.delete(f"/v1/tasks/{task['id']}").status_code == 204
    assert get(b, task["id"]).status_code == 404
    with b.client() as client:
        response = client.post(f"/v1/tasks/{task['id']}/classify", files=images(probes()[:1]))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "task_not_found"
        assert task["id"] not in {t["id"] for t in client.get("/v1/tasks").json()["tasks"]}


def test_concurrent_additions_on_two_replicas_one_wins_and_no_shot_is_lost(
    cluster: tuple[Replica, Replica],
) -> None:
    a, b = cluster
    task = create(a)
    additions = {"a": ("ship",), "b": ("truck",)}
    answers: dict[str, httpx.Response] = {}
    barrier = threading.Barrier(2)

    def add(name: str, replica: Replica) -> None:
        barrier.wait(30)
        answers[name] = add_shots(replica, task["id"], additions[name], skip=0)

    threads = [threading.Thread(target=add, args=item) for item in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    statuses = {name: response.status_code for name, response in answers.items()}
    assert set(statuses.values()) <= {200, 409}, {n: r.text for n, r in answers.items()}
    accepted = [name for name, status in statuses.items() if status == 200]
    assert accepted, statuses
    for response in answers.values():
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "version_conflict", response.text
    final = get(b, task["id"]).json()
    assert final == get(a, task["id"]).json()
    assert final["version"] == 1 + len(accepted)
    # Every acknowledged addition is in the task; a refused one is not (it was never half applied).
    expected = {"airplane": 3, "automobile": 3, "bird": 3} | {additions[name][0]: 2 for name in accepted}
    assert shot_counts(final) == expected


def test_a_background_build_started_on_one_replica_is_polled_on_the_other(cluster: tuple[Replica, Replica]) -> None:
    a, b = cluster
    with a.client() as client:
        response = client.post("/v1/tasks", **multipart(shots(BASE, 3), wait="false"))
    assert response.status_code == 202, response.text
    task_id = response.json()["id"]
    states = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        polled = get(b, task_id)
        assert polled.status_code in (200, 202), polled.text
        states.append(polled.json()["status"])
        if polled.status_code == 200:
            break
        time.sleep(0.2)
    assert states[-1] == "ready", states
    assert set(states) <= {"building", "ready"}
    assert_same_answers(classify(a, task_id), classify(b, task_id))


def test_a_store_outage_answers_503_and_the_replicas_recover_by_themselves(
    cluster: tuple[Replica, Replica], postgres: PostgresServer
) -> None:
    a, b = cluster
    task = create(a)
    postgres.pause()
    try:
        for replica in (a, b):
            # Readiness first, before any request has met the outage: it answers within the probe's timeout.
            response = httpx.get(f"{replica.base_url}/readyz", timeout=PROBE_TIMEOUT_S)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            with replica.client() as client:
                response = client.get(f"/v1/tasks/{task['id']}")
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable"
                assert "unavailable" in response.json()["error"]["message"]
                assert client.get("/healthz").status_code == 200  # alive, just not ready
            assert readiness(replica.base_url) == 503
        time.sleep(5)  # a long outage: the store's pool backs off its reconnection attempts meanwhile
    finally:
        postgres.resume()
    for replica in (a, b):
        deadline = time.monotonic() + 60
        while readiness(replica.base_url) != 200:  # every probe answers, 503 until the store is back
            assert time.monotonic() < deadline, f"{replica.name} did not recover"
            time.sleep(0.2)
    assert_same_answers(classify(a, task["id"]), classify(b, task["id"]))
