"""`shotcache serve` asks uvicorn for uvloop + httptools explicitly, and says so when it must fall back."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from app import server
from app.settings import Settings


def test_uvloop_and_httptools_are_chosen_when_importable() -> None:
    pytest.importorskip("uvloop")
    pytest.importorskip("httptools")
    assert server.transport() == server.Transport(loop="uvloop", http="httptools")


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ({"uvloop"}, server.Transport(loop="asyncio", http="httptools")),
        ({"httptools"}, server.Transport(loop="uvloop", http="h11")),
        ({"uvloop", "httptools"}, server.Transport(loop="asyncio", http="h11")),
    ],
)
def test_a_missing_module_falls_back_with_a_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, missing: set[str], expected: server.Transport
) -> None:
    monkeypatch.setattr(server, "_importable", lambda module: module not in missing)
    with caplog.at_level(logging.WARNING, logger=server.__name__):
        assert server.transport() == expected
    assert all(f"{name} not importable" in caplog.text or f"{name}, " in caplog.text for name in missing)
    assert f"loop={expected.loop} http={expected.http}" in caplog.text


def test_serve_passes_the_transport_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(server.uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(server, "transport", lambda: server.Transport(loop="asyncio", http="h11"))
    server.serve(Settings(host="127.0.0.1", port=18701), {})
    assert len(calls) == 1
    assert (calls[0]["loop"], calls[0]["http"], calls[0]["port"]) == ("asyncio", "h11", 18701)


@pytest.mark.parametrize(("environ", "expected"), [({}, False), ({"SHOTCACHE_ACCESS_LOG": "true"}, True)])
def test_the_access_log_is_off_unless_asked_for(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: bool
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(server.uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("SHOTCACHE_ACCESS_LOG", raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    server.serve(Settings(host="127.0.0.1", port=18702), {})
    assert [call["access_log"] for call in calls] == [expected]
