"""What routes need, as typed FastAPI dependencies (the engine lives on `app.state.engine`).

They are `async def` although none of them awaits: FastAPI runs a plain `def` dependency in its
threadpool, and two such hops per request cost more than everything else the event loop does for it.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from service.access import Access, Denied
from service.engine import Engine, NotServing
from service.versions import LoadedVersion


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def get_version(engine: EngineDep) -> LoadedVersion:
    """The version serving now; 503 when no artifact is loaded (still loading, or none published)."""
    try:
        return engine.serving()
    except NotServing as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"} if exc.loading else None) from None


VersionDep = Annotated[LoadedVersion, Depends(get_version)]


async def get_serving_engine(engine: EngineDep) -> Engine:
    """The engine, once it serves a version (503 before, as `get_version`)."""
    await get_version(engine)  # called, not declared: one dependency less to solve on every request
    return engine


ServingEngineDep = Annotated[Engine, Depends(get_serving_engine)]


async def require_admin(engine: EngineDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = engine.settings.admin_token
    if token is None:
        raise HTTPException(403, "the admin API is disabled; set STL_ADMIN_TOKEN to enable it")
    scheme, _, value = (authorization or "").partition(" ")
    # compare_digest: the time taken must not reveal how much of a guessed token was right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        value.strip().encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            401, "missing or wrong admin token; send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Annotated[None, Depends(require_admin)]


async def check_access(request: Request) -> None:
    """API key and rate limit of a protected route; returns at once when both are off (the default)."""
    access: Access = request.app.state.access
    if not access.enabled:
        return
    headers = request.headers
    client = request.client
    try:
        access.admit(headers.get("authorization"), headers.get("x-api-key"), client.host if client else None)
    except Denied as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers) from None


# On the protected routes' decorators: `dependencies=[Protected]`.
Protected = Depends(check_access)
