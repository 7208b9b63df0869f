"""The error answers each route documents in OpenAPI: exactly the statuses it can give, with their headers.

Every error body is `{"error": {"code", "message"}}` (`ErrorResponse`). The fuzz tests
(tests/reliability/test_fuzz_schema.py) check every answer against these declarations, so a status a
route can give but does not declare here fails them.
"""

from __future__ import annotations

from typing import Any

from .schemas import ErrorResponse

_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}
}
_WWW_AUTHENTICATE = {
    "WWW-Authenticate": {"description": 'Always `Bearer realm="shotcache"`.', "schema": {"type": "string"}}
}

_ERRORS: dict[int, tuple[str, dict[str, Any] | None]] = {
    400: ("The body is not parseable multipart/form-data.", None),
    401: ("Missing or unknown API key (only when SHOTCACHE_API_KEYS is set).", _WWW_AUTHENTICATE),
    403: ("The key is not an admin key.", None),
    404: ("No such task for this tenant (another tenant's task answers 404 too).", None),
    409: ("The task is still building, or was built with another model.", None),
    413: ("Request body, a file, an image's pixels, or the number of files over its limit.", None),
    415: ("A file is not an allowed image format (checked by magic bytes).", None),
    422: ("Malformed form: missing or invalid field, labels vs images, corrupt image, ...", None),
    429: ("Busy (the encoder queue or the task builds are full); retry after `Retry-After` seconds.", _RETRY_AFTER),
    503: ("The service is starting (model not loaded yet).", None),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _ERRORS[status]
        entry: dict[str, Any] = {"model": ErrorResponse, "description": description}
        if headers:
            entry["headers"] = headers
        out[status] = entry
    return out
