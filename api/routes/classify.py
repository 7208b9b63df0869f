"""/v1/tasks/{id}/classify: a multipart form of images, or one image as the raw request body.

Both forms build the same `ClassifyRequest` and answer the same `ClassifyOut`; the service checks it once.
The raw form (`Content-Type: image/jpeg|png|webp`, options as query parameters) is the fast path for one
image: it skips multipart parsing, and it is a plain Starlette route (`RawClassifyRoute`) that parses its
query with the same pydantic rules FastAPI applies and serialises the answer once, without FastAPI's
per-request dependency solving and response re-validation. Those took 0.3-0.5 ms of a 6-8 ms one-client
request with the stand-in (docs/benchmarks.md, request path). Which route serves a request is decided by its
Content-Type (`RawClassifyRoute.matches`); OpenAPI shows one operation with both request bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import Response
from starlette.routing import Match, request_response
from starlette.types import Receive, Scope, Send

from app.errors import AppError, ErrorCode
from app.service import ClassifyRequest, UploadedImage

from ..deps import CallerDep, ServiceDep, caller_of, get_service
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


class RawClassifyOptions(BaseModel):
    """The raw body's query options (`_OPTIONS`), parsed as FastAPI parses query parameters (pydantic's lax
    mode: `top_k=3`, `abstain=true|1|yes|on`); what they mean is checked by the service."""

    model_config = ConfigDict(extra="ignore")

    top_k: int = 5
    method: str | None = None
    abstain: bool = False
    evidence: int = 0


def media_type(content_type: str | None) -> str:
    """`image/jpeg` of `Image/JPEG; charset=x` ('' when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


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


def _raw_options(request: Request) -> RawClassifyOptions:
    """The query options, or the 422 FastAPI would give for them (same handler, same message)."""
    try:
        return RawClassifyOptions.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


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


async def classify_raw(http: Request) -> Response:
    """One image as the body. Checked in the order FastAPI's route checked it: service ready, API key, query
    options; then the Content-Type, the task (404/409 before reading the body), the body's size."""
    service = await get_service(http)
    caller = await caller_of(http)
    options = _raw_options(http)
    _checked_content_type(http)
    task_id: str = http.path_params["task_id"]
    await service.get(caller.tenant, task_id)
    uploads = [UploadedImage(None, await _read_body(http, service.limits.max_file_bytes))]
    request = ClassifyRequest(uploads, **options.model_dump())
    answer = classify_out(await service.classify(caller.tenant, task_id, request), uploads)
    return Response(answer.model_dump_json(), media_type="application/json")


class RawClassifyRoute(APIRoute):
    """POST of a body that is not a form; forms go to the multipart route of the same path.

    An `APIRoute`, so FastAPI's router asks its own `matches` (it rebuilds plain Starlette routes without
    their subclass), but `handle` runs `classify_raw` as a plain Starlette endpoint: the app's exception
    handlers still map its errors, and the middleware (metrics, body limit) sees it like any route."""

    def __init__(self, path: str) -> None:
        super().__init__(path, classify_raw, methods=["POST"], include_in_schema=False)
        self._endpoint_app = request_response(classify_raw)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE:
            return match, child
        for name, value in scope.get("headers") or ():
            if name == b"content-type":
                if media_type(value.decode("latin-1")) in _FORM_TYPES:
                    return Match.NONE, {}
                break
        return match, child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":  # the 405 (with Allow) that FastAPI gives
            await super().handle(scope, receive, send)
            return
        await self._endpoint_app(scope, receive, send)


# Before the multipart route, so it sees every request to the path; it declines forms. Not in the schema:
# the multipart operation documents both bodies.
router.routes.append(RawClassifyRoute(router.prefix + "/{task_id}/classify"))


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
