"""App factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the model and indexes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from service.access import Access
from service.admission import Admission, Unavailable
from service.encoder import check_precision_available
from service.engine import Engine
from service.examples import examples_router
from service.follow import Follower, FollowMetrics
from service.images import BadInput
from service.metrics import Metrics
from service.middleware import AdmissionGate, BodySizeLimit, RequestMetrics
from service.page import page_router
from service.process import run_in_own_thread
from service.routes import router
from service.settings import Settings, get_settings

LOG = logging.getLogger(__name__)

# What a shop's own front end may send and read across origins (STL_CORS_ORIGINS).
CORS_HEADERS = ["Authorization", "X-API-Key", "X-Request-Timeout-Ms", "Content-Type", "If-None-Match"]
CORS_EXPOSED = ["Retry-After", "ETag"]

DESCRIPTION = (
    "Shop the Look: upload a scene photo, name a category (and optionally the item's bbox), get the "
    "catalogue products of that category that go with it. Falls back to the most popular products "
    "when no embedding can be served."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; nothing is loaded until its lifespan starts (TestClient or uvicorn). AccessError
    when STL_API_KEYS names a key file that cannot be read, RuntimeUnavailable when STL_PRECISION=bf16
    cannot run here."""
    settings = settings if settings is not None else get_settings()
    check_precision_available(settings)  # bf16 where it cannot run: refused now, not a degraded service
    metrics = Metrics()
    admission = Admission(settings, metrics)
    access = Access.from_settings(settings, metrics)
    follow_metrics = FollowMetrics(metrics, settings.reload_poll_s)  # per app: a lifespan may run twice

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine.start(settings, metrics, admission)  # threads and deployment policy; nothing loaded yet
        app.state.engine = engine
        # STL_RELOAD_POLL_S: follow `current` by ourselves (service/follow.py); off by default.
        follower = (Follower(engine, admission, settings.reload_poll_s, follow_metrics)
                    if settings.reload_poll_s > 0 else None)
        app.state.follower = follower

        loader: asyncio.Future | None = None
        try:
            # In a thread of its own: loading takes seconds and the loop stays free, so /healthz answers and
            # /readyz says 503 "loading" (orchestrators wait on it) instead of the port refusing connections;
            # and the thread ends afterwards, taking its OpenMP team with it (see service/process.py).
            loader = asyncio.ensure_future(run_in_own_thread(engine.load, "stl-load"))
            if not settings.background_load:
                await loader
            if follower is not None:
                follower.start()  # its looks wait while a background load runs
            yield
        finally:
            if follower is not None:
                await follower.stop()  # a reload under way finishes before the engine closes
            if loader is not None and not loader.done():
                await loader  # a load thread cannot be cancelled; let it finish before tearing down
            engine.close()
            LOG.info("service stopped")

    app = FastAPI(title="Shop the Look", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.admission = admission
    app.state.access = access
    app.include_router(router)
    app.include_router(page_router)
    app.include_router(examples_router)
    # Added last = outermost. Metrics see every request; CORS headers go on refusals too (a browser hides
    # a 503 or 429 without them); the gate refuses before sizes are checked or a body is read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AdmissionGate, admission=admission)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "POST"],
                           allow_headers=CORS_HEADERS, expose_headers=CORS_EXPOSED, max_age=600)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_exception_handler(BadInput, _bad_input)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(Exception, _unexpected)
    return app


async def _bad_input(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadInput)
    LOG.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unavailable)
    return JSONResponse({"detail": exc.detail}, status_code=503, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Only true bugs get here: every client mistake is a BadInput or HTTPException with a 4xx.
    LOG.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
