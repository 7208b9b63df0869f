"""Liveness, readiness, info, usage, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import AdminDep, CallerDep, ServiceDep
from ..responses import errors
from ..schemas import Health, Info, Usage

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """The process is alive (says nothing about the model)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=errors(503), tags=["health"])
async def readyz(request: Request) -> Health | JSONResponse:
    """The model is loaded and warmed up, tasks are restored, the task store answers."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        return JSONResponse({"error": {"code": "not_ready", "message": "starting"}}, status_code=503)
    problem = await service.store_problem()  # at once during a known outage, else one bounded round trip
    if problem is not None:
        return JSONResponse({"error": {"code": "store_unavailable", "message": problem}}, status_code=503)
    return Health(status="ready")


@router.get("/v1/info", response_model=Info, responses=errors(401, 503), tags=["info"])
async def info(service: ServiceDep, caller: CallerDep, request: Request) -> Info:
    """Model (and whether it is the offline stand-in), methods, limits, version."""
    data = service.info()
    data["tasks"] = len((await service.list(caller.tenant)).tasks)
    if not caller.admin:
        data["damaged_tasks"] = [d for d in data["damaged_tasks"] if d["tenant"] == caller.tenant]
    return Info(**data, auth="open" if request.app.state.keys.open else "api-keys")


@router.get(
    "/v1/admin/usage",
    response_model=Usage,
    responses=errors(401, 403, 503),
    tags=["admin"],
)
async def usage(service: ServiceDep, _: AdminDep) -> Usage:
    """Tasks and bytes stored per tenant (admin key)."""
    return Usage(tenants=await service.usage())


@router.get(
    "/metrics",
    tags=["health"],
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics() -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
