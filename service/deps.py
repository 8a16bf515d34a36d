"""What routes need, as typed FastAPI dependencies (state lives on `app.state.services`).

They are `async def` although none of them awaits: FastAPI runs a plain `def` dependency in its
threadpool, and two such hops per request cost more than everything else the event loop does for it.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from service.batching import Batcher
from service.engine import Engine, EngineHolder
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    holder: EngineHolder
    batcher: Batcher
    # Decoding, cropping and searching run here, not in the 40-thread default pool: more threads than
    # cores only adds memory and steals CPU from the forward pass.
    cpu_pool: ThreadPoolExecutor


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_engine(services: ServicesDep) -> Engine:
    """The engine serving now; 503 when no artifact is loaded (still loading, or none published)."""
    engine = services.holder.engine
    if engine is None:
        if services.holder.loading:
            raise HTTPException(503, "the service is still loading its index", headers={"Retry-After": "5"})
        raise HTTPException(503, f"no index artifact is available: {services.holder.load_error}")
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def require_admin(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    token = services.settings.admin_token
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
