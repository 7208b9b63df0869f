"""/v1/tasks/{id}/shots/{shot}/thumbnail: a stored shot's small JPEG (the page's evidence pictures)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import CallerDep, ServiceDep
from ..responses import errors

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])


@router.get(
    "/{task_id}/shots/{shot}/thumbnail",
    response_class=Response,
    responses={
        200: {"description": "The shot's thumbnail (JPEG, at most 160 px a side).", "content": {"image/jpeg": {}}},
        **errors(401, 404, 409, 422, 503),
    },
)
async def shot_thumbnail(service: ServiceDep, caller: CallerDep, task_id: str, shot: int) -> Response:
    """Made once when the shot was added; tenant-scoped like the task; gone with the task."""
    jpeg = await service.thumbnail(caller.tenant, task_id, shot)
    # Private: another tenant's key gets 404; a shot's picture never changes within a task.
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
