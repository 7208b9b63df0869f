"""Multipart helpers: read uploads within limits, parse the JSON-valued form fields."""

from __future__ import annotations

import json
from typing import Any

from fastapi import UploadFile

from app.service import ClassSpec, UploadedImage
from app.service.errors import InvalidInput, PayloadTooLarge


async def read_uploads(files: list[UploadFile], max_file_bytes: int) -> list[UploadedImage]:
    out = []
    for i, upload in enumerate(files):
        name = upload.filename or f"image {i}"
        if upload.size is not None and upload.size > max_file_bytes:
            raise PayloadTooLarge(
                f"{name}: {upload.size} bytes exceeds the per-file limit of {max_file_bytes} bytes",
                code="file_too_large",
            )
        data = await upload.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise PayloadTooLarge(
                f"{name}: exceeds the per-file limit of {max_file_bytes} bytes", code="file_too_large"
            )
        out.append(UploadedImage(upload.filename, data))
    return out


def _json_field(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"`{name}` is not valid JSON: {exc}", code="invalid_json") from None


def parse_templates(text: str | None) -> list[str] | None:
    if text is None:
        return None
    value = _json_field("templates", text)
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInput(
            '`templates` must be a JSON list of strings, e.g. ["a photo of a {}."]', code="invalid_templates"
        )
    return value


def parse_classes(text: str | None) -> dict[str, ClassSpec]:
    """`{"cat": ["a small feline"], "dog": {"prompts": [...], "templates": false}}`."""
    if text is None:
        return {}
    value = _json_field("classes", text)
    if not isinstance(value, dict):
        raise InvalidInput("`classes` must be a JSON object mapping class names to prompts", code="invalid_classes")
    out = {}
    for name, spec in value.items():
        if isinstance(spec, list):
            spec = {"prompts": spec}
        if not isinstance(spec, dict) or set(spec) - {"prompts", "templates"}:
            raise InvalidInput(
                f'`classes[{name!r}]` must be a list of prompts or {{"prompts": [...], "templates": bool}}',
                code="invalid_classes",
            )
        prompts = spec.get("prompts", [])
        templates = spec.get("templates", True)
        if (
            not isinstance(prompts, list)
            or not all(isinstance(p, str) for p in prompts)
            or not isinstance(templates, bool)
        ):
            raise InvalidInput(
                f"`classes[{name!r}]`: prompts must be strings, templates a boolean", code="invalid_classes"
            )
        out[name.strip()] = ClassSpec(tuple(prompts), templates)
    return out


def parse_hyperparams(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    value = _json_field("hyperparams", text)
    if not isinstance(value, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
    ):
        raise InvalidInput("`hyperparams` must be a JSON object of numbers", code="invalid_hyperparams")
    return {str(k): float(v) for k, v in value.items()}
