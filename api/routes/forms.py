"""Multipart helpers: read uploads within the per-file limit, decode the JSON-valued form fields.

Parsing only: what the values mean is checked once, by the service (app/service/requests.py).
"""

from __future__ import annotations

import json

from fastapi import UploadFile

from app.errors import AppError, ErrorCode
from app.service import UploadedImage


async def read_uploads(files: list[UploadFile], max_file_bytes: int) -> list[UploadedImage]:
    out = []
    for i, upload in enumerate(files):
        name = upload.filename or f"image {i}"
        if upload.size is not None and upload.size > max_file_bytes:
            raise AppError(
                ErrorCode.FILE_TOO_LARGE,
                f"{name}: {upload.size} bytes exceeds the per-file limit of {max_file_bytes} bytes",
            )
        data = await upload.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise AppError(ErrorCode.FILE_TOO_LARGE, f"{name}: exceeds the per-file limit of {max_file_bytes} bytes")
        out.append(UploadedImage(upload.filename, data))
    return out


def json_field(name: str, text: str | None) -> object:
    """The parsed JSON of form field `name` (None when absent)."""
    if text is None:
        return None
    try:
        value: object = json.loads(text)
    except ValueError as exc:
        raise AppError(ErrorCode.INVALID_JSON, f"`{name}` is not valid JSON: {exc}") from None
    return value
