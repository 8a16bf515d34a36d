"""App factory: `create_app(settings)` builds the FastAPI app; its lifespan loads the model and indexes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.batching import Batcher
from service.deps import Services
from service.engine import EngineHolder, initial_load
from service.images import BadInput
from service.metrics import Metrics
from service.middleware import BodySizeLimit, RequestMetrics
from service.routes import router
from service.settings import Settings, get_settings
from service.threads import run_in_own_thread
from training.model.device import resolve_device

LOG = logging.getLogger(__name__)

DESCRIPTION = (
    "Shop the Look: upload a scene photo, name a category (and optionally the item's bbox), get the "
    "catalogue products of that category that go with it. Falls back to the most popular products "
    "when no embedding can be served."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app; nothing is loaded until its lifespan starts (TestClient or uvicorn)."""
    settings = settings if settings is not None else get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        holder = EngineHolder(settings.artifacts)
        batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000.0,
                          on_batch=metrics.batch_size.observe, workers=_batch_workers(settings))
        cpu_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="stl-cpu")
        app.state.services = Services(settings=settings, metrics=metrics, holder=holder, batcher=batcher,
                                      cpu_pool=cpu_pool)
        def load() -> None:
            initial_load(holder, settings)
            engine = holder.engine
            metrics.set_index(engine.version if engine else None, engine.status if engine else "unavailable")

        loader: asyncio.Future | None = None
        try:
            # In a thread of its own: loading takes seconds and the loop stays free, so /healthz answers and
            # /readyz says 503 "loading" (orchestrators wait on it) instead of the port refusing connections;
            # and the thread ends afterwards, taking its OpenMP team with it (see service/threads.py).
            loader = asyncio.ensure_future(run_in_own_thread(load, "stl-load"))
            if not settings.background_load:
                await loader
            yield
        finally:
            if loader is not None and not loader.done():
                await loader  # a load thread cannot be cancelled; let it finish before tearing down
            batcher.close()
            cpu_pool.shutdown(wait=True, cancel_futures=True)
            LOG.info("service stopped")

    app = FastAPI(title="Shop the Look", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.include_router(router)
    # Added last = outermost: sizes are checked before anything else runs, and metrics see every request.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_exception_handler(BadInput, _bad_input)
    app.add_exception_handler(Exception, _unexpected)
    return app


def _batch_workers(settings: Settings) -> int:
    """STL_BATCH_WORKERS, or by default one per intra-op thread on a CPU (see service/batching.py) and
    one on a GPU."""
    if settings.batch_workers > 0:
        return settings.batch_workers
    try:
        device = resolve_device(settings.device)
    except ValueError:  # cuda asked for and absent: the load reports it; popularity needs no workers
        return 1
    return 1 if device.type == "cuda" else torch.get_num_threads()


async def _bad_input(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadInput)
    LOG.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Only true bugs get here: every client mistake is a BadInput or HTTPException with a 4xx.
    LOG.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)
