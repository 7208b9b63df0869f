"""`api.client.ShotcacheClient` against a real server process (and, for the retry rules, a scripted
transport): typed answers, typed errors with the service's code and message, progress, retries."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api.client import (
    Busy,
    InvalidRequest,
    NotFound,
    ShotcacheClient,
    ShotcacheError,
    Unauthorized,
    Unavailable,
    images_from_folder,
)
from api.schemas import BuildOut, ClassifyOut, TaskOut

from .conftest import ALICE_KEY, CLASSES, SHOTS, Server, images


def test_create_classify_add_delete(open_server: Server, shots: dict[str, list[Path]]) -> None:
    seen: list[tuple[str, int, int]] = []
    probes = images("test", 2)
    with ShotcacheClient(open_server.url) as client:
        task = client.create_task(shots, name="client", progress=lambda *event: seen.append(event))
        assert isinstance(task, TaskOut)
        assert task.name == "client"
        assert {c.name: c.shots for c in task.classes} == dict.fromkeys(CLASSES, SHOTS)
        assert task.version == 1

        uploads = [(done, total) for stage, done, total in seen if stage == "upload"]
        assert uploads, seen
        assert [d for d, _ in uploads] == sorted(d for d, _ in uploads)
        assert uploads[-1][0] == uploads[-1][1]  # every byte reported sent
        builds = [(done, total) for stage, done, total in seen if stage == "build"]
        assert all(total == len(CLASSES) * SHOTS and 0 <= done <= total for done, total in builds)

        paths = [p for ps in probes.values() for p in ps]
        truth = [name for name, ps in probes.items() for _ in ps]
        answer = client.classify(task.id, [paths[0], paths[1].read_bytes(), *paths[2:]], top_k=2)
        assert isinstance(answer, ClassifyOut)
        assert answer.task_version == 1
        assert [len(r.top_k) for r in answer.results] == [2] * len(paths)
        assert answer.results[0].filename == paths[0].name
        right = sum(r.label == t for r, t in zip(answer.results, truth, strict=True))
        assert right >= len(paths) / 2  # 3 classes (chance 1/3); the stand-in measured 5/6 here
        single = client.classify(task.id, paths[0], top_k=1)
        assert single.results[0].label == answer.results[0].label

        grown = client.add_shots(task.id, {"frog": images("train", 1, skip=SHOTS, classes=("frog",))["frog"]})
        assert grown.version == 2
        assert {c.name: c.shots for c in grown.classes}["frog"] == SHOTS + 1
        assert task.id in [t.id for t in client.list_tasks().tasks]

        client.delete_task(task.id)
        with pytest.raises(NotFound) as missing:
            client.get_task(task.id)
        assert missing.value.code == "task_not_found"
        assert task.id in missing.value.message
        assert task.id not in [t.id for t in client.list_tasks().tasks]


def test_from_folder_in_the_background(open_server: Server, shot_folder: Path) -> None:
    assert images_from_folder(shot_folder) == {name: sorted((shot_folder / name).iterdir()) for name in CLASSES}
    with ShotcacheClient(open_server.url) as client:
        build = client.create_task(folder=shot_folder, wait=False, method="tip-adapter")
        assert isinstance(build, BuildOut)
        assert build.total == len(CLASSES) * SHOTS
        task = client.wait_ready(build.id, timeout=300)
        assert task.method == "tip-adapter"
        assert task.name == "pets"  # the folder's name, none having been given
        assert [c.name for c in task.classes] == sorted(CLASSES)
        client.delete_task(task.id)


def test_errors_carry_the_services_code_and_message(open_server: Server, shots: dict[str, list[Path]]) -> None:
    broken = ("broken.jpg", b"\xff\xd8\xff\xe0 not a jpeg" + bytes(100))
    with ShotcacheClient(open_server.url) as client:
        with pytest.raises(InvalidRequest) as one_class:
            client.create_task({"cat": shots[CLASSES[0]]})
        assert one_class.value.status == 422
        assert one_class.value.code == "too_few_classes"
        with pytest.raises(ShotcacheError) as corrupt:
            client.create_task({**shots, CLASSES[0]: [*shots[CLASSES[0]], broken]})
        assert corrupt.value.code == "corrupt_image"
        assert corrupt.value.message.startswith("broken.jpg:")
        with pytest.raises(NotFound):
            client.classify("no-such-task", shots[CLASSES[0]][0])
    with pytest.raises(TypeError), ShotcacheClient(open_server.url) as client:
        client.create_task(shots, folder="somewhere")


def test_api_key(keyed_server: Server) -> None:
    with ShotcacheClient(keyed_server.url) as anonymous, pytest.raises(Unauthorized) as refused:
        anonymous.list_tasks()
    assert refused.value.code == "unauthorized"
    with ShotcacheClient(keyed_server.url, api_key=ALICE_KEY) as alice:
        assert alice.info().auth == "api-keys"
        assert alice.list_tasks().tasks == []


def _scripted(answers: list[httpx.Response], bodies: list[bytes]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return answers.pop(0)

    return httpx.MockTransport(handle)


def test_retries_honour_retry_after() -> None:
    busy = {"error": {"code": "busy", "message": "the encoder queue is full"}}
    ok = {"task_id": "t", "task_version": 1, "model": "m", "results": []}
    answers = [
        httpx.Response(429, json=busy, headers={"Retry-After": "3"}),
        httpx.Response(503, json={"error": {"code": "not_ready", "message": "starting"}}),
        httpx.Response(200, json=ok),
    ]
    bodies: list[bytes] = []
    slept: list[float] = []
    client = ShotcacheClient("http://test", transport=_scripted(answers, bodies), backoff=0.5)
    client.sleep = slept.append
    answer = client.classify("t", b"image bytes")
    assert answer.task_id == "t"
    assert slept == [3.0, 1.0]  # Retry-After wins over the first backoff; then 0.5 * 2
    assert len(bodies) == 3
    assert bodies[0] == bodies[1] == bodies[2]  # the same upload each time
    assert b"image bytes" in bodies[0]

    always_busy = [httpx.Response(429, json=busy, headers={"Retry-After": "1"}) for _ in range(3)]
    client = ShotcacheClient("http://test", transport=_scripted(always_busy, bodies), retries=2)
    client.sleep = slept.append
    with pytest.raises(Busy) as gave_up:
        client.list_tasks()
    assert gave_up.value.retry_after == 1.0
    assert gave_up.value.message == "the encoder queue is full"
    assert always_busy == []  # 1 try + 2 retries

    starting = [httpx.Response(503, json={"error": {"code": "not_ready", "message": "starting"}})]
    client = ShotcacheClient("http://test", transport=_scripted(starting, bodies), retries=0)
    with pytest.raises(Unavailable):
        client.info()
