"""Helpers for the end-to-end HTTP tests: apps on fresh data dirs with the real stand-in model, real
cifar10-mini images, multipart builders and error assertions.

Every client made here fails the test on any 5xx answer (a response hook), so "no 500 anywhere" holds
for every request the API tests send. One open app with one ready task is shared by the whole session
(`api_client`, `base_task`); modules that need other settings or a restart start their own apps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from benchmarks.server_process import link_model
from tests.conftest import dataset_dir

# The four cifar10-mini classes of the shared task; chance is 1/4.
BASE_CLASSES = ("airplane", "automobile", "bird", "cat")
BASE_SHOTS = 6

Shot = tuple[Path, str]
Files = list[tuple[str, tuple[str, bytes, str]]]
_counter = itertools.count()


def cifar_images(split: str, classes: Sequence[str], per_class: int, *, skip: int = 0) -> list[Shot]:
    """(path, class) for `per_class` images of each class, after skipping the first `skip` of each."""
    root = dataset_dir("cifar10-mini") / split
    out = []
    for name in classes:
        paths = sorted((root / name).glob("*.jpg"))[skip : skip + per_class]
        assert len(paths) == per_class, f"cifar10-mini {split}/{name} has too few images"
        out.extend((p, name) for p in paths)
    return out


def files_of(shots: Sequence[Shot] | Sequence[Path]) -> Files:
    """Multipart `images` parts for the given image paths (or (path, label) pairs)."""
    paths = [s[0] if isinstance(s, tuple) else s for s in shots]
    return [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def raw_files(*items: tuple[str, bytes]) -> Files:
    return [("images", (name, data, "application/octet-stream")) for name, data in items]


def labels_of(shots: Sequence[Shot]) -> list[str]:
    return [label for _, label in shots]


def create_task(
    client: TestClient, shots: Sequence[Shot], *, headers: dict[str, str] | None = None, **form: Any
) -> dict[str, Any]:
    """POST /v1/tasks with the shots; asserts 201 and returns the task."""
    response = client.post(
        "/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots), **form}, headers=headers
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def classify(
    client: TestClient,
    task_id: str,
    images: Sequence[Shot] | Sequence[Path],
    *,
    headers: dict[str, str] | None = None,
    **form: Any,
) -> dict[str, Any]:
    response = client.post(f"/v1/tasks/{task_id}/classify", files=files_of(images), data=form, headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


def accuracy(answer: dict[str, Any], truth: Sequence[Shot]) -> float:
    results = answer["results"]
    assert len(results) == len(truth)
    return sum(r["label"] == label for r, (_, label) in zip(results, truth, strict=True)) / len(truth)


def assert_error(response: httpx.Response, status: int, code: str | None = None, *mentions: str) -> dict[str, Any]:
    """The answer is `status` with `{"error": {"code", "message"}}` whose message names every `mentions`."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message"}, error
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    for word in mentions:
        assert word.lower() in error["message"].lower(), f"{word!r} not in {error['message']!r}"
    return dict(error)


def _no_server_errors(response: httpx.Response) -> None:
    if response.status_code >= 500:
        response.read()
        raise AssertionError(
            f"{response.request.method} {response.request.url.path} answered {response.status_code}: {response.text}"
        )


@contextmanager
def running_app(settings: Any) -> Iterator[TestClient]:
    """A TestClient with the lifespan running (model loaded, tasks restored); every 5xx fails the test."""
    from api.main import create_app

    with TestClient(create_app(settings)) as client:
        client.event_hooks = {"request": [], "response": [_no_server_errors]}
        yield client


def link_standin(data_dir: Path, model_data_dir: Path) -> None:
    link_model(data_dir, model_data_dir)


@pytest.fixture(scope="session")
def make_settings(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """`make_settings(data_dir=None, **overrides)`: Settings on a data dir with the stand-in linked in
    (a fresh one unless `data_dir` is given: pass an earlier one to restart on the same state)."""
    from app.settings import Settings

    def make(data_dir: Path | None = None, **overrides: Any) -> Settings:
        if data_dir is None:
            data_dir = tmp_path_factory.mktemp(f"api-{next(_counter)}") / "data"
            link_standin(data_dir, model_data_dir)
        return Settings(**{"model": "offline", "data_dir": data_dir, "threads": 2, "workers": 2, **overrides})

    return make


@pytest.fixture(scope="session")
def api_client(make_settings: Callable[..., Any]) -> Iterator[TestClient]:
    """One open app (default settings) shared by the modules that need no special settings."""
    with running_app(make_settings()) as client:
        yield client


@pytest.fixture(scope="session")
def base_shots() -> list[Shot]:
    return cifar_images("train", BASE_CLASSES, BASE_SHOTS)


@pytest.fixture(scope="session")
def base_task(api_client: TestClient, base_shots: list[Shot]) -> dict[str, Any]:
    """A ready task on the shared app: 4 cifar10-mini classes x 6 shots, the default method."""
    return create_task(api_client, base_shots, name="base")
