"""The hostile-file corpus over HTTP, through task creation and classification, with the API open and with keys.

tests/api/test_errors.py already sends every refused corpus file through create (open API), five of them
through classify, and the small accepted ones through classify. This adds what it lacks: every refused file
through classify, a task *built* from the accepted ones (large ones included: 6 MB of EXIF, 6 MB of text,
4000 x 3000), the polyglots and edge shapes of hostile_extra.py through both routes, and all of it with API
keys on as well. Each file gets its documented answer, and the service stays healthy.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.app.hostile_images import all_hostile_files

from .conftest import FuzzApp
from .hostile_extra import extra_files
from .images import image_paths, parts, shots


class Hostile:
    def __init__(self, name: str, data: bytes, statuses: set[int], code: str | None) -> None:
        self.name, self.data, self.statuses, self.code = name, data, statuses, code


def hostile_files() -> list[Hostile]:
    files = [Hostile(f.name, f.data, {f.expected_status}, f.expected_code) for f in all_hostile_files()]
    files += [Hostile(f.name, f.data, set(f.statuses), None) for f in extra_files()]
    return files


def _raw(*files: Hostile) -> list[Any]:
    return [("images", (f.name, f.data, "application/octet-stream")) for f in files]


def _post(fuzz: FuzzApp, url: str, files: list[Any], data: dict[str, Any] | None = None) -> Any:
    with fuzz.client() as client:
        return client.post(url, files=files, data=data or {}, headers=fuzz.headers[fuzz.owner])


def _assert_refused(response: Any, bad: Hostile) -> None:
    assert response.status_code in bad.statuses, (bad.name, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert bad.name in error["message"], error
    if bad.code is not None:
        assert error["code"] == bad.code, error


@pytest.mark.slow
@pytest.mark.parametrize("which", ["open", "keys"])
def test_refused_files_answer_their_4xx_in_classify_and_create(fuzz_apps: dict[str, FuzzApp], which: str) -> None:
    fuzz = fuzz_apps[which]
    task_id = fuzz.tasks[0]
    good = parts([image_paths("test", "cat")[0]])
    refused = [f for f in hostile_files() if f.statuses != {200}]
    extra = {f.name for f in extra_files()}
    assert len(refused) >= 25
    create_shots = shots("train", ("cat", "dog"), 2, skip=20)
    for bad in refused:
        _assert_refused(_post(fuzz, f"/v1/tasks/{task_id}/classify", good + _raw(bad)), bad)
        if bad.name in extra:  # the base corpus goes through create in tests/api/test_errors.py
            labels = [label for _, label in create_shots]
            response = _post(fuzz, "/v1/tasks", parts(create_shots[:-1]) + _raw(bad), {"labels": labels})
            _assert_refused(response, bad)
    with fuzz.client() as client:
        assert client.get("/readyz").status_code == 200
        listed = client.get("/v1/tasks", headers=fuzz.headers[fuzz.owner]).json()
        assert listed["building"] == []
    assert _post(fuzz, f"/v1/tasks/{task_id}/classify", good).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("which", ["open", "keys"])
def test_a_task_built_from_awkward_images_classifies_them(fuzz_apps: dict[str, FuzzApp], which: str) -> None:
    """Polyglots, CMYK, 16-bit, palette, animated, multi-page, EXIF-rotated, broken EXIF, 6-10 MB of metadata,
    4000 x 3000, 16 x 16, 12,000 x 16: all are images, so a task can be made of them and they classify."""
    fuzz = fuzz_apps[which]
    accepted = [f for f in hostile_files() if f.statuses == {200}]
    assert len(accepted) >= 20
    assert sum(len(f.data) for f in accepted) > 20_000_000  # the large ones are in
    labels = ["odd" if i % 2 else "even" for i in range(len(accepted))]
    response = _post(fuzz, "/v1/tasks", _raw(*accepted), {"labels": labels, "name": "awkward"})
    assert response.status_code == 201, response.text
    task = response.json()
    assert {c["name"]: c["shots"] for c in task["classes"]} == {
        "even": (len(accepted) + 1) // 2,
        "odd": len(accepted) // 2,
    }

    response = _post(fuzz, f"/v1/tasks/{task['id']}/classify", _raw(*accepted), {"top_k": "2"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [f.name for f in accepted]
    for result in results:
        assert result["label"] in {"odd", "even"}
        assert abs(sum(e["probability"] for e in result["top_k"]) - 1) < 1e-5
    with fuzz.client() as client:
        assert client.delete(f"/v1/tasks/{task['id']}", headers=fuzz.headers[fuzz.owner]).status_code == 204
