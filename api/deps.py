"""FastAPI dependencies: the service, and the calling tenant (auth).

All `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool, two thread
hand-offs per dependency on every request (measured on the classify path: docs/benchmarks.md, served section).
They only read app state and compare key digests, so they run on the event loop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import AppError, ErrorCode
from app.service import TaskService

from .auth import PUBLIC_TENANT, Caller, KeyRing

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` when SHOTCACHE_API_KEYS is set.")


async def get_service(request: Request) -> TaskService:
    service: TaskService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise AppError(ErrorCode.NOT_READY, "the service is starting; retry shortly")
    return service


async def get_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    keys: KeyRing = request.app.state.keys
    if keys.open:
        return Caller(PUBLIC_TENANT)
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AppError(ErrorCode.UNAUTHORIZED, "missing API key: send `Authorization: Bearer <key>`")
    caller = keys.identify(credentials.credentials)
    if caller is None:
        raise AppError(ErrorCode.UNAUTHORIZED, "unknown API key")
    return caller


async def caller_of(request: Request) -> Caller:
    """`get_caller` for a route that runs without FastAPI's dependency injection (the raw-body classify)."""
    return await get_caller(request, await _bearer(request))


async def get_admin(caller: Annotated[Caller, Depends(get_caller)], request: Request) -> Caller:
    if not caller.admin and not request.app.state.keys.open:
        raise AppError(ErrorCode.FORBIDDEN, "this route needs an admin key")
    return caller


ServiceDep = Annotated[TaskService, Depends(get_service)]
CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]
