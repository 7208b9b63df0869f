"""The domain errors of the service, and the one table of their codes.

`app/` raises `AppError(code, message)`: what went wrong, in words a client can act on, and a code a
program can branch on. It knows nothing of HTTP: `api/errors.py` alone maps each code to a status (and a
test checks that every code here has one). A new failure gets a new member here, never a status.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # --- the request is malformed or breaks a rule (a client bug) --------------------------------
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    NO_IMAGES = "no_images"
    LABELS_MISMATCH = "labels_mismatch"
    EMPTY_LABEL = "empty_label"
    LABEL_TOO_LONG = "label_too_long"
    NAME_TOO_LONG = "name_too_long"
    TOO_FEW_CLASSES = "too_few_classes"
    TOO_MANY_CLASSES = "too_many_classes"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_VIEWS = "invalid_views"
    INVALID_TEMPLATES = "invalid_templates"
    INVALID_CLASSES = "invalid_classes"
    INVALID_CLASS_PROMPTS = "invalid_class_prompts"
    UNKNOWN_CLASS_IN_CLASSES = "unknown_class_in_classes"
    CLASS_EXISTS = "class_exists"
    INVALID_HYPERPARAMS = "invalid_hyperparams"
    HYPERPARAMS_WITHOUT_METHOD = "hyperparams_without_method"
    INVALID_TOP_K = "invalid_top_k"
    INVALID_EVIDENCE = "invalid_evidence"
    # --- an uploaded file is not an acceptable image (app/images.py) --------------------------------
    EMPTY_FILE = "empty_file"
    CORRUPT_IMAGE = "corrupt_image"
    IMAGE_TOO_SMALL = "image_too_small"
    UNSUPPORTED_FORMAT = "unsupported_format"
    # --- something is over a size limit ----------------------------------------------------------
    FILE_TOO_LARGE = "file_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    TOO_MANY_FILES = "too_many_files"
    REQUEST_TOO_LARGE = "request_too_large"
    # --- the task -------------------------------------------------------------------------------
    TASK_NOT_FOUND = "task_not_found"
    SHOT_NOT_FOUND = "shot_not_found"
    BUILDING = "building"
    MODEL_MISMATCH = "model_mismatch"
    VERSION_CONFLICT = "version_conflict"
    TASK_DAMAGED = "task_damaged"
    # --- the service ----------------------------------------------------------------------------
    BUSY = "busy"
    NOT_READY = "not_ready"
    STORE_UNAVAILABLE = "store_unavailable"  # a shared task store (PostgreSQL) does not answer: transient
    SHUTTING_DOWN = "shutting_down"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INTERNAL_ERROR = "internal_error"


class AppError(Exception):
    """A failure the client is told about: a code from `ErrorCode` and a message naming the problem."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Busy(AppError):  # noqa: N818 (the condition)
    """Admission refused the work; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(ErrorCode.BUSY, message)
        self.retry_after = retry_after


class StaleVersion(AppError):  # noqa: N818 (the condition)
    """A write built from an older version lost the store's compare-and-set; `live` is the version now
    live (None: the task is gone)."""

    def __init__(self, message: str, *, live: int | None) -> None:
        super().__init__(ErrorCode.VERSION_CONFLICT, message)
        self.live = live
