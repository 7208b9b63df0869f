"""Service errors. Each carries the HTTP status and a machine-readable code; the API maps them 1:1."""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(ServiceError):  # noqa: N818 (named after the HTTP answer)
    status = 422
    code = "invalid_input"


class NotFound(ServiceError):  # noqa: N818 (named after the HTTP answer)
    status = 404
    code = "not_found"


class Conflict(ServiceError):  # noqa: N818 (named after the HTTP answer)
    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):  # noqa: N818 (named after the HTTP answer)
    status = 413
    code = "payload_too_large"


class UnsupportedMedia(ServiceError):  # noqa: N818 (named after the HTTP answer)
    status = 415
    code = "unsupported_media_type"


class Busy(ServiceError):  # noqa: N818 (named after the HTTP answer)
    """The encoder queue is full; the client should retry after `retry_after` seconds."""

    status = 429
    code = "busy"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
