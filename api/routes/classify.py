"""/v1/tasks/{id}/classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.service import ClassifyRequest

from ..deps import CallerDep, ServiceDep
from ..schemas import ClassifyOut
from .forms import read_uploads
from .tasks import UPLOAD_ERRORS
from .views import classify_out

router = APIRouter(prefix="/v1/tasks", tags=["classify"])


@router.post("/{task_id}/classify", response_model=ClassifyOut, responses=UPLOAD_ERRORS)
async def classify(
    service: ServiceDep,
    caller: CallerDep,
    task_id: str,
    images: Annotated[list[UploadFile], File(min_length=1, description="Images to classify.")],
    top_k: Annotated[int, Form(description="How many classes to list per image.")] = 5,
    method: Annotated[str | None, Form(description="Use this method instead of the task's own.")] = None,
    abstain: Annotated[
        bool, Form(description="Answer label null when the top probability is below the task's threshold.")
    ] = False,
) -> ClassifyOut:
    await service.get(caller.tenant, task_id)  # 404/409 before reading the uploads
    uploads = await read_uploads(images, service.limits.max_file_bytes)
    request = ClassifyRequest(uploads, top_k=top_k, method=method, abstain=abstain)
    return classify_out(await service.classify(caller.tenant, task_id, request), uploads)
