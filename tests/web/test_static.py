"""The page's files: served by exact name with their types, shipped as package data, self-contained."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.routes.page import STATIC
from tests.conftest import REPO


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The app without its lifespan: the page needs no model."""
    from api.main import create_app
    from app.settings import Settings

    return TestClient(create_app(Settings(model="offline", data_dir=tmp_path_factory.mktemp("static"))))


def test_page_and_modules_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    for name in re.findall(r'(?:src|href)="/static/([^"]+)"', page.text):
        assert client.get(f"/static/{name}").status_code == 200, name
    script = client.get("/static/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    imported = set(re.findall(r'from "\./([\w-]+\.js)"', "".join(p.read_text() for p in STATIC.glob("*.js"))))
    assert imported == {"api.js", "create.js", "dom.js", "task.js"}
    for name in imported:
        assert client.get(f"/static/{name}").status_code == 200, name


@pytest.mark.parametrize("name", ["nope.js", "..%2Fpage.py", "%2E%2E%2F%2E%2E%2Fpyproject.toml", "index.htm"])
def test_only_the_shipped_files_are_served(client: TestClient, name: str) -> None:
    answer = client.get(f"/static/{name}")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_the_page_is_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not any(p.startswith("/static") for p in paths)


def test_files_are_package_data_and_fetch_nothing_from_elsewhere() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["api"]
    files = sorted(p for p in STATIC.iterdir() if p.is_file())
    assert files
    for path in files:
        relative = str(path.relative_to(Path(STATIC).parent))
        assert any(fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not package data"
        text = path.read_text()
        # No CDN, font or any other remote resource: the page works air-gapped.
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path.name
        assert "@import" not in text
