"""Every error leaves as JSON `{"error": {"code": str, "message": str}}` with a 4xx status; an
unexpected exception is a 500 in the same shape (and a log line), never a stack trace.

`STATUS` is the one table from domain error codes (app/errors.py) to HTTP statuses: app/ knows no
statuses, and a test checks that every code has one here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.errors import AppError, Busy, ErrorCode
from app.store.base import StoreUnavailable

log = logging.getLogger(__name__)

_C = ErrorCode
STATUS: dict[ErrorCode, int] = {
    **dict.fromkeys(
        (
            _C.INVALID_REQUEST,
            _C.INVALID_JSON,
            _C.NO_IMAGES,
            _C.LABELS_MISMATCH,
            _C.EMPTY_LABEL,
            _C.LABEL_TOO_LONG,
            _C.NAME_TOO_LONG,
            _C.TOO_FEW_CLASSES,
            _C.TOO_MANY_CLASSES,
            _C.UNKNOWN_METHOD,
            _C.INVALID_VIEWS,
            _C.INVALID_TEMPLATES,
            _C.INVALID_CLASSES,
            _C.INVALID_CLASS_PROMPTS,
            _C.UNKNOWN_CLASS_IN_CLASSES,
            _C.CLASS_EXISTS,
            _C.INVALID_HYPERPARAMS,
            _C.HYPERPARAMS_WITHOUT_METHOD,
            _C.INVALID_TOP_K,
            _C.INVALID_EVIDENCE,
            _C.EMPTY_FILE,
            _C.CORRUPT_IMAGE,
            _C.IMAGE_TOO_SMALL,
        ),
        422,
    ),
    _C.UNSUPPORTED_FORMAT: 415,
    **dict.fromkeys((_C.FILE_TOO_LARGE, _C.IMAGE_TOO_LARGE, _C.TOO_MANY_FILES, _C.REQUEST_TOO_LARGE), 413),
    _C.TASK_NOT_FOUND: 404,
    _C.SHOT_NOT_FOUND: 404,
    **dict.fromkeys((_C.BUILDING, _C.MODEL_MISMATCH, _C.VERSION_CONFLICT, _C.TASK_DAMAGED), 409),
    _C.BUSY: 429,
    **dict.fromkeys((_C.NOT_READY, _C.STORE_UNAVAILABLE, _C.SHUTTING_DOWN), 503),
    _C.UNAUTHORIZED: 401,
    _C.FORBIDDEN: 403,
    _C.INTERNAL_ERROR: 500,
}


def status_of(code: ErrorCode) -> int:
    return STATUS[code]


def body_too_large_message(limit: int) -> str:
    return f"the request body exceeds the limit of {limit / 2**20:.3g} MB ({limit} bytes)"


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def app_error_response(exc: AppError) -> JSONResponse:
    headers = None
    if isinstance(exc, Busy):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif exc.code == ErrorCode.UNAUTHORIZED:  # RFC 9110: a 401 names the scheme the client should use
        headers = {"WWW-Authenticate": 'Bearer realm="shotcache"'}
    return error_response(status_of(exc.code), exc.code, exc.message, headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return app_error_response(exc)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        # Transient and not the client's fault: 503 with a retry hint. The message names the store
        # without credentials (the store guarantees that).
        return error_response(503, ErrorCode.STORE_UNAVAILABLE, str(exc), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        undecodable = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if undecodable is not None:  # a JSON body (PATCH) that does not parse: say so, and where
            loc = undecodable.get("loc", ())
            at = f" at character {loc[-1]}" if len(loc) > 1 else ""
            reason = (undecodable.get("ctx") or {}).get("error") or undecodable.get("msg", "JSON decode error")
            return error_response(
                status_of(ErrorCode.INVALID_JSON), ErrorCode.INVALID_JSON, f"the body is not valid JSON{at}: {reason}"
            )
        return error_response(422, ErrorCode.INVALID_REQUEST, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, ErrorCode.INTERNAL_ERROR, "internal error; it has been logged")
