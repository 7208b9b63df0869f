"""/v1/tasks: create, list, read, update (method, name), delete, add shots."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status
from fastapi.responses import JSONResponse

from app.service import METHODS, AddShotsRequest, BuildStatus, CreateTaskRequest, UpdateTaskRequest

from ..deps import CallerDep, ServiceDep
from ..errors import status_of
from ..responses import errors
from ..schemas import BuildOut, TaskList, TaskOut, TaskUpdate
from .forms import json_field, read_uploads
from .views import build_out, task_out

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

# What a multipart route that reads images can answer, besides its success (see api/responses.py).
UPLOAD_ERRORS = errors(400, 401, 404, 409, 413, 415, 422, 429, 503)
_ACCEPTED = {
    "model": BuildOut,
    "description": "`wait=false`: the build runs in the background; poll the task at `Location`.",
    "headers": {"Location": {"description": "The task's URL.", "schema": {"type": "string"}}},
}

ImagesField = Annotated[
    list[UploadFile], File(min_length=1, description="Shot images (JPEG, PNG, WebP, BMP, GIF, TIFF).")
]
LabelsField = Annotated[list[str], Form(min_length=1, description="One class label per image, same order.")]
ClassesField = Annotated[
    str | None,
    Form(
        description='JSON: per-class prompts, e.g. {"cat": ["a photo of a small cat"], '
        '"dog": {"prompts": [...], "templates": false}}'
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskOut,
    responses={202: _ACCEPTED, **errors(400, 401, 413, 415, 422, 429, 503)},
)
async def create_task(
    service: ServiceDep,
    caller: CallerDep,
    images: ImagesField,
    labels: LabelsField,
    name: Annotated[str | None, Form(description="A name for the task.")] = None,
    method: Annotated[
        str | None,
        Form(description=f"{', '.join(METHODS)}, or auto (best by leave-one-out)."),
    ] = None,
    views: Annotated[int | None, Form(description="Augmented views per shot (1-32).")] = None,
    templates: Annotated[str | None, Form(description="JSON list of prompt templates with one {}.")] = None,
    classes: ClassesField = None,
    hyperparams: Annotated[
        str | None, Form(description="JSON object of hyper-parameters for `method` (skips tuning).")
    ] = None,
    wait: Annotated[bool, Form(description="false: answer 202 at once and build in the background.")] = True,
) -> TaskOut | JSONResponse:
    request = CreateTaskRequest(
        images=await read_uploads(images, service.limits.max_file_bytes),
        labels=labels,
        classes=json_field("classes", classes),
        name=name,
        method=method,
        views=views,
        templates=json_field("templates", templates),
        hyperparams=json_field("hyperparams", hyperparams),
        wait=wait,
    )
    created = await service.create(caller.tenant, request)
    if isinstance(created, BuildStatus):
        return JSONResponse(
            build_out(created).model_dump(),
            status_code=status.HTTP_202_ACCEPTED,
            headers={"Location": f"/v1/tasks/{created.task_id}"},
        )
    return task_out(created)


@router.get("", response_model=TaskList, responses=errors(401, 503))
async def list_tasks(service: ServiceDep, caller: CallerDep) -> TaskList:
    listing = await service.list(caller.tenant)
    return TaskList(tasks=[task_out(t) for t in listing.tasks], building=[build_out(b) for b in listing.building])


@router.get(
    "/{task_id}",
    response_model=TaskOut,
    # A failed background build answers with its error's status (413, 415, 422, 429); the body is the
    # error and also carries the build's id, status and progress.
    responses={
        202: {"model": BuildOut, "description": "Still building (`wait=false`)."},
        **errors(401, 404, 409, 413, 415, 422, 429, 503),
    },
)
async def get_task(service: ServiceDep, caller: CallerDep, task_id: str) -> TaskOut | JSONResponse:
    build = await service.build_status(caller.tenant, task_id)
    if build is not None:
        # Building: 202. Failed: the status of the build's error (e.g. 422 for a corrupt image), so a client
        # polling while 202 stops; the body carries the id, progress and `error: {code, message}`.
        code = status.HTTP_202_ACCEPTED
        if build.error_code is not None:
            code = status_of(build.error_code)
        return JSONResponse(build_out(build).model_dump(), status_code=code)
    return task_out(await service.get(caller.tenant, task_id))


@router.patch("/{task_id}", response_model=TaskOut, responses=errors(400, 401, 404, 409, 413, 422, 429, 503))
async def update_task(service: ServiceDep, caller: CallerDep, task_id: str, update: TaskUpdate) -> TaskOut:
    """Serve another method (re-tuned on the stored shots, or `auto` ranking them again) and/or rename the task."""
    request = UpdateTaskRequest(method=update.method, name=update.name, rename="name" in update.model_fields_set)
    return task_out(await service.update(caller.tenant, task_id, request))


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=errors(401, 404, 409, 422, 503))
async def delete_task(service: ServiceDep, caller: CallerDep, task_id: str) -> Response:
    await service.delete(caller.tenant, task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{task_id}/shots", response_model=TaskOut, responses=UPLOAD_ERRORS)
async def add_shots(
    service: ServiceDep,
    caller: CallerDep,
    task_id: str,
    images: ImagesField,
    labels: LabelsField,
    classes: ClassesField = None,
) -> TaskOut:
    await service.get(caller.tenant, task_id)  # 404 before reading the uploads
    request = AddShotsRequest(
        images=await read_uploads(images, service.limits.max_file_bytes),
        labels=labels,
        classes=json_field("classes", classes),
    )
    return task_out(await service.add_shots(caller.tenant, task_id, request))
