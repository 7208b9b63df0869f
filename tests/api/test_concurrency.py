"""Classify while shots are being added: every answer comes whole from the old or the new version."""

from __future__ import annotations

import threading
from typing import Any

from fastapi.testclient import TestClient

from .conftest import cifar_images, classify, create_task, files_of, labels_of

OLD = ("airplane", "automobile", "bird")
NEW = "ship"
CLASSIFIERS = 3
# The same image's probabilities move in the last float bits with the encoder's batch size (requests
# share batches); a mix of two versions would be off by far more.
TOLERANCE = 1e-4


def close(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return [e["label"] for e in a] == [e["label"] for e in b] and all(
        abs(e["probability"] - f["probability"]) <= TOLERANCE for e, f in zip(a, b, strict=True)
    )


def test_classify_during_add_shots_sees_one_version(api_client: TestClient) -> None:
    task = create_task(api_client, cifar_images("train", OLD, 4))
    task_id = task["id"]
    probes = cifar_images("test", (*OLD, NEW), 1)
    reference_v1 = classify(api_client, task_id, probes, top_k=10)["results"]

    added = cifar_images("train", ("bird",), 2, skip=4) + cifar_images("train", (NEW,), 4)
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    added_done = threading.Event()

    def classify_loop() -> None:
        try:
            extra_rounds = 2  # keep going a little after the update, so the new version is seen too
            while extra_rounds > 0:
                if added_done.is_set():
                    extra_rounds -= 1
                response = api_client.post(f"/v1/tasks/{task_id}/classify", files=files_of(probes), data={"top_k": 10})
                assert response.status_code == 200, response.text
                with lock:
                    answers.append(response.json())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=classify_loop) for _ in range(CLASSIFIERS)]
    for thread in threads:
        thread.start()
    try:
        response = api_client.post(
            f"/v1/tasks/{task_id}/shots", files=files_of(added), data={"labels": labels_of(added)}
        )
    finally:
        added_done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 2
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    reference_v2 = classify(api_client, task_id, probes, top_k=10)["results"]
    assert reference_v2 != reference_v1
    classes = {1: set(OLD), 2: {*OLD, NEW}}
    references = {1: reference_v1, 2: reference_v2}
    seen = {1: 0, 2: 0}
    for answer in answers:
        version = answer["task_version"]
        assert version in references, answer
        seen[version] += 1
        assert len(answer["results"]) == len(probes)
        for result, expected in zip(answer["results"], references[version], strict=True):
            # Exactly that version's classes, with that version's probabilities.
            assert {e["label"] for e in result["top_k"]} == classes[version]
            assert close(result["top_k"], expected["top_k"]), (version, result, expected)
    assert seen[1] >= 1, seen  # answers during the update came from the old version...
    assert seen[2] >= CLASSIFIERS, seen  # ...and every thread saw the new one after it
