"""/v1/tasks/{id}/classify: a multipart form of images, or one image as the raw request body.

Both forms build the same `ClassifyRequest` and answer the same `ClassifyOut`; the service checks it once.
The raw form (`Content-Type: image/jpeg|png|webp`, options as query parameters) skips multipart parsing,
part of the HTTP layer's own cost for a one-image request (docs/benchmarks.md, served section).
Which handler serves a request is decided by its Content-Type (`RawBodyRoute`); OpenAPI shows one
operation with both request bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from app.errors import AppError, ErrorCode
from app.service import ClassifyRequest, UploadedImage

from ..deps import CallerDep, ServiceDep
from ..schemas import ClassifyOut
from .forms import read_uploads
from .tasks import UPLOAD_ERRORS
from .views import classify_out

router = APIRouter(prefix="/v1/tasks", tags=["classify"])

RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

_OPTIONS = {
    "top_k": ({"type": "integer", "default": 5}, "How many classes to list per image."),
    "method": ({"type": "string"}, "Use this method instead of the task's own."),
    "abstain": (
        {"type": "boolean", "default": False},
        "Answer label null when the top probability is below the task's threshold.",
    ),
    "evidence": (
        {"type": "integer", "default": 0},
        "Also return each image's k nearest shots (ids, class, cosine); 0: none.",
    ),
}


def media_type(content_type: str | None) -> str:
    """`image/jpeg` of `Image/JPEG; charset=x` ('' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


class RawBodyRoute(APIRoute):
    """Matches only requests whose body is not a form; forms go to the multipart route of the same path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE:
            return match, child
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        if media_type(content_type) in _FORM_TYPES:
            return Match.NONE, {}
        return match, child


def _raw_body_openapi() -> dict[str, Any]:
    """The raw form, merged into the multipart operation's OpenAPI (lists are appended, dicts merged)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {"content": dict.fromkeys(RAW_IMAGE_TYPES, binary)},
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": schema, "description": f"{text} Raw body only."}
            for name, (schema, text) in _OPTIONS.items()
        ],
    }


def _checked_content_type(request: Request) -> None:
    kind = media_type(request.headers.get("content-type"))
    if kind not in RAW_IMAGE_TYPES:
        raise AppError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"Content-Type {kind or '(none)'!r} is not accepted here: send a multipart/form-data form, or one "
            f"image as the body with Content-Type {', '.join(RAW_IMAGE_TYPES)}",
        )


async def _read_body(request: Request, max_file_bytes: int) -> bytes:
    """The body, refused (413) past the per-file limit: by Content-Length at once, else while streaming."""
    declared = request.headers.get("content-length")
    too_large = AppError(
        ErrorCode.FILE_TOO_LARGE, f"request body: exceeds the per-file limit of {max_file_bytes} bytes"
    )
    if declared is not None and declared.isdigit() and int(declared) > max_file_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_file_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def classify_raw(
    service: ServiceDep,
    caller: CallerDep,
    task_id: str,
    http: Request,
    top_k: Annotated[int, Query()] = 5,
    method: Annotated[str | None, Query()] = None,
    abstain: Annotated[bool, Query()] = False,
    evidence: Annotated[int, Query()] = 0,
) -> ClassifyOut:
    _checked_content_type(http)
    await service.get(caller.tenant, task_id)  # 404/409 before reading the body
    uploads = [UploadedImage(None, await _read_body(http, service.limits.max_file_bytes))]
    request = ClassifyRequest(uploads, top_k=top_k, method=method, abstain=abstain, evidence=evidence)
    return classify_out(await service.classify(caller.tenant, task_id, request), uploads)


# Registered before the multipart route so it sees every request to the path; it declines forms
# (`RawBodyRoute.matches`). Not in the schema: the multipart operation documents both bodies.
router.add_api_route(
    "/{task_id}/classify",
    classify_raw,
    methods=["POST"],
    response_model=ClassifyOut,
    include_in_schema=False,
    route_class_override=RawBodyRoute,
)


@router.post(
    "/{task_id}/classify",
    response_model=ClassifyOut,
    responses=UPLOAD_ERRORS,
    description="Send the images as a multipart form (field `images`, options as form fields), or ONE image as "
    f"the request body with `Content-Type: {' | '.join(RAW_IMAGE_TYPES)}` and the options as query parameters. "
    "Same checks, same answer (a raw body's `filename` is null).",
    openapi_extra=_raw_body_openapi(),
)
async def classify(
    service: ServiceDep,
    caller: CallerDep,
    task_id: str,
    images: Annotated[list[UploadFile], File(min_length=1, description="Images to classify.")],
    top_k: Annotated[int, Form(description=_OPTIONS["top_k"][1])] = 5,
    method: Annotated[str | None, Form(description=_OPTIONS["method"][1])] = None,
    abstain: Annotated[bool, Form(description=_OPTIONS["abstain"][1])] = False,
    evidence: Annotated[int, Form(description=_OPTIONS["evidence"][1])] = 0,
) -> ClassifyOut:
    # No early task check here (unlike the raw body): FastAPI has parsed the form already, and
    # service.classify's own lookup is the request's one version check against the store.
    uploads = await read_uploads(images, service.limits.max_file_bytes)
    request = ClassifyRequest(uploads, top_k=top_k, method=method, abstain=abstain, evidence=evidence)
    return classify_out(await service.classify(caller.tenant, task_id, request), uploads)
