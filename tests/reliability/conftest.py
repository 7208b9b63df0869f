"""Fixtures for the reliability tests: in-process apps for the fuzzers (one open, one with API keys).

The fuzz apps run their lifespan through schemathesis' ASGI transport, which starts it once per app and
keeps it for the session; every request to them, the fixtures' own included, goes through
`schemathesis.python.asgi.get_client`, so no second lifespan (and no second model copy) is ever started.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from benchmarks.server_process import prepare_data_dir

from .images import DatasetMissingError, dataset_root, parts, shots

ALICE_KEY = "alice-key-0001"
BOB_KEY = "bob-key-000002"
ADMIN_KEY = "admin-key-0003"


@dataclass
class FuzzApp:
    """An app under fuzzing, the tasks made for it, and the Authorization headers its callers may send."""

    name: str
    app: Any
    headers: dict[str, dict[str, str]]  # caller -> headers ("alice", "bob", "admin", "nobody", "forged", ...)
    owner: str  # the caller who owns `tasks`
    valid_callers: frozenset[str]  # callers whose headers carry a valid key
    tasks: list[str] = field(default_factory=list)  # made by the fixture: never deleted
    throwaway: list[str] = field(default_factory=list)  # made by the fuzzer: may be deleted

    def client(self) -> Any:
        from schemathesis.python import asgi

        return asgi.get_client(self.app)


def _create_base_task(fuzz: FuzzApp) -> str:
    items = shots("train", ("cat", "dog"), 3)
    with fuzz.client() as client:
        response: requests.Response = client.post(
            "/v1/tasks",
            files=parts(items),
            data={"labels": [label for _, label in items], "name": "fuzz base"},
            headers=fuzz.headers[fuzz.owner],
        )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _make_app(model_data_dir: Path, root: Path, **settings: Any) -> Any:
    from api.main import create_app
    from app.settings import Settings

    data_dir = root / "data"
    prepare_data_dir(data_dir, model_data_dir)
    return create_app(Settings(model="offline", data_dir=data_dir, threads=2, workers=2, **settings))


@pytest.fixture(scope="session")
def fuzz_apps(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FuzzApp]]:
    """`open` (no keys) and `keys` (alice and bob, plus an admin key), each with one ready task."""
    try:
        dataset_root()
    except DatasetMissingError as exc:
        pytest.skip(str(exc))
    from schemathesis.python import asgi

    open_app = FuzzApp(
        "open",
        _make_app(model_data_dir, tmp_path_factory.mktemp("fuzz-open")),
        headers={"anyone": {}, "bearer-junk": {"Authorization": "Bearer whatever"}},
        owner="anyone",
        valid_callers=frozenset(),
    )
    keyed_app = FuzzApp(
        "keys",
        _make_app(
            model_data_dir,
            tmp_path_factory.mktemp("fuzz-keys"),
            api_keys=[f"alice:{ALICE_KEY}", f"bob:{BOB_KEY}"],
            admin_keys=[ADMIN_KEY],
        ),
        headers={
            "alice": {"Authorization": f"Bearer {ALICE_KEY}"},
            "bob": {"Authorization": f"Bearer {BOB_KEY}"},
            "admin": {"Authorization": f"Bearer {ADMIN_KEY}"},
            "nobody": {},
            "forged": {"Authorization": f"Bearer {ALICE_KEY[:-1]}2"},
            "basic": {"Authorization": "Basic YWxpY2U6YWxpY2Uta2V5LTAwMDE="},
        },
        owner="alice",
        valid_callers=frozenset({"alice", "bob", "admin"}),
    )
    apps = {"open": open_app, "keys": keyed_app}
    try:
        for fuzz in apps.values():
            fuzz.tasks.append(_create_base_task(fuzz))
        yield apps
    finally:
        asgi.shutdown_lifespans()  # stops both services (encoder queues, thread pools)
