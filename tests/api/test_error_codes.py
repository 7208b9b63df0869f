"""One table of error codes (app/errors.py) and one mapping to HTTP statuses (api/errors.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.errors import STATUS, app_error_response
from app.errors import AppError, Busy, ErrorCode, StaleVersion

APP = Path(__file__).resolve().parents[2] / "app"


def test_every_code_has_exactly_one_status() -> None:
    assert set(STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in STATUS.values())


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (AppError(ErrorCode.TASK_NOT_FOUND, "task x not found"), 404, {}),
        (StaleVersion("changed meanwhile", live=3), 409, {}),
        (Busy("full", retry_after=2.4), 429, {"retry-after": "2"}),
        (AppError(ErrorCode.UNAUTHORIZED, "missing key"), 401, {"www-authenticate": 'Bearer realm="shotcache"'}),
    ],
)
def test_codes_map_to_statuses_and_headers(error: AppError, status: int, headers: dict[str, str]) -> None:
    response = app_error_response(error)
    assert response.status_code == status
    assert response.body == f'{{"error":{{"code":"{error.code}","message":"{error.message}"}}}}'.encode()
    for name, value in headers.items():
        assert response.headers[name] == value


def test_app_knows_no_http_status() -> None:
    """No status number next to an error in app/: statuses are api/'s business."""
    pattern = re.compile(
        r"\b(?:status|status_code|error_status)\s*[=:]\s*\d{3}\b|\b[45]\d\d\s*:\s*(?:Payload|Unsupported)"
    )
    offenders = [
        f"{path.relative_to(APP.parent)}:{number}"
        for path in APP.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
