"""The HTTP endpoints: thin handlers over the engine, batcher and metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Annotated

import faiss
import numpy as np
import torch
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, Response, UploadFile

from index.artifact import ArtifactError, CategoryIndex
from service.deps import AdminDep, EngineDep, Services, ServicesDep
from service.engine import Engine, load_engine
from service.images import BadInput, decode_image, parse_bbox
from service.schemas import (
    CategoriesResponse,
    CategoryInfo,
    ErrorResponse,
    HealthResponse,
    Item,
    ReadyResponse,
    RecommendResponse,
    ReloadResponse,
    Strategy,
)
from service.threads import run_in_own_thread
from training.data.stl import BBox, UnknownCategory
from training.model.preprocess import CropTooSmall, bbox_to_pixels

LOG = logging.getLogger(__name__)

router = APIRouter()

MAX_K = 100
ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 503)}


def _prepare(data: bytes, bbox: BBox | None, max_pixels: int, engine: Engine, embed: bool) -> torch.Tensor | None:
    """Decode and crop (CPU work, run off the event loop); the crop tensor, or None when not embedding."""
    embedder = engine.embedder if embed else None
    try:
        if embedder is None:
            picture = decode_image(data, max_pixels)
            bbox_to_pixels(picture.width, picture.height, bbox)  # the same crop-size rule, no tensor needed
            return None
        # The embedder's own decoder and transform: exactly the pixels the index build saw.
        picture = decode_image(data, max_pixels, lambda raw: embedder.load_image(raw, bbox))
        return embedder.transform(picture, bbox)
    except CropTooSmall as exc:
        raise BadInput(400, f"the bbox crop is too small to embed: {exc}") from exc


def _search(index: CategoryIndex, vector: np.ndarray, k: int, threads: int) -> list[tuple[str, float]]:
    """One query's hits, with faiss held to `threads` OpenMP threads for the call (0: faiss's default).

    A search is one vector: parallelism comes from concurrent requests, and a thread that searched with
    an OpenMP team of its own would leave that team spinning on the cores the forward pass needs (seen
    as a native thread burning ~1 ms of CPU per request). Set and restored around the call, not once per
    thread: on the batcher's thread a lasting limit would also bind torch's forward pass wherever torch
    and faiss share one OpenMP runtime.
    """
    if threads <= 0:
        return index.search(np.asarray(vector)[None, :], k)[0]
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return index.search(np.asarray(vector)[None, :], k)[0]
    finally:
        faiss.omp_set_num_threads(previous)


def _fallback(engine: Engine, category: str, strategy: str) -> tuple[str, str] | None:
    """(metric reason, text for the client) when popularity must answer, else None."""
    if strategy == "popularity":
        return "strategy", "popularity strategy requested"
    if not engine.model_loaded:
        return "model_unavailable", f"no valid model/index is loaded: {engine.problem}"
    if category not in engine.indexes:
        return "no_index", f"category {category!r} has no embedding index"
    return None


def _popularity_items(engine: Engine, category: str, k: int) -> list[tuple[str, float]]:
    if engine.popularity is None:
        return []
    try:
        return engine.popularity.top(category, k)
    except KeyError:  # a category the table does not know has no popular products to offer
        return []


@router.post(
    "/recommend", response_model=RecommendResponse, responses=ERRORS,
    summary="Products of one category that go with the item in a scene photo",
)
async def recommend(
    request: Request,
    services: ServicesDep,
    engine: EngineDep,
    image: Annotated[UploadFile, File(description="scene photo: JPEG, PNG or WebP")],
    category: Annotated[str, Form(description="short name ('Shoes') or full path ('Apparel & Accessories|Shoes')")],
    bbox: Annotated[str | None, Form(description="'left,top,right,bottom' in [0,1], origin top-left")] = None,
    k: Annotated[int, Form(ge=1, le=MAX_K, description="number of products")] = 10,
    strategy: Annotated[Strategy, Form(description="auto: embeddings with fallback; popularity")] = "auto",
) -> Response:
    started = time.perf_counter()
    settings, metrics = services.settings, services.metrics
    try:
        full_path = engine.resolver.resolve(category)
    except UnknownCategory as exc:
        raise BadInput(400, str(exc)) from None
    box = parse_bbox(bbox)
    data = await image.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise BadInput(413, f"the image is larger than STL_MAX_UPLOAD_MB = {settings.max_upload_mb} MB")

    fallback = _fallback(engine, full_path, strategy)
    hits: list[tuple[str, float]] | None = None
    try:
        loop = asyncio.get_running_loop()
        prepare = functools.partial(_prepare, data, box, settings.max_image_pixels, engine, fallback is None)
        if fallback is not None:
            await loop.run_in_executor(services.cpu_pool, prepare)  # still refuses a bad image or crop
        else:
            assert engine.embedder is not None
            # On a CPU the batcher's own thread decodes and crops just before the forward pass (see
            # service/batching.py); on a GPU the pool does it, overlapping the GPU's forward pass.
            inline = settings.preprocess_inline
            if inline is None:
                inline = engine.embedder.device.type == "cpu"
            search = functools.partial(_search, engine.indexes[full_path], k=k, threads=settings.faiss_threads)
            if inline:  # decode, crop, forward and search in one go on the batcher's thread
                hits = await services.batcher.embed(engine.embedder, prepare, search)
            else:
                crop = await loop.run_in_executor(services.cpu_pool, prepare)
                vector = await services.batcher.embed(engine.embedder, crop)
                hits = await loop.run_in_executor(services.cpu_pool, search, vector)
    except BadInput:
        raise
    except Exception as exc:  # the model or index broke on this request: log, count, answer by popularity
        if fallback is not None:
            raise  # not embedding, so this is a bug, not a model failure
        LOG.exception("embedding search failed for category %s; serving popularity", full_path)
        fallback = ("embedding_failed", f"embedding failed: {type(exc).__name__}")

    if hits is None:
        assert fallback is not None
        metrics.fallbacks.labels(reason=fallback[0]).inc()
        hits = _popularity_items(engine, full_path, k)
    source = "embedding" if fallback is None else "popularity"
    request.state.source = source
    answer = RecommendResponse(
        category=full_path,
        source=source,
        fallback_reason=None if fallback is None else fallback[1],
        items=[Item(product_id=pid, score=score, rank=rank) for rank, (pid, score) in enumerate(hits[:k], 1)],
        index_version=engine.version,
        took_ms=round((time.perf_counter() - started) * 1000.0, 3),
    )
    # Serialised here: returned as a model, FastAPI would validate it a second time against response_model.
    return Response(answer.model_dump_json(), media_type="application/json")


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Ready to serve: 'ready', or 'degraded' (popularity only); 503 while loading")
async def readyz(services: ServicesDep, response: Response) -> ReadyResponse:
    holder, engine = services.holder, services.holder.engine
    if engine is None:
        response.status_code = 503
        return ReadyResponse(
            status="loading" if holder.loading else "unavailable", index_version=None, categories=0,
            indexed_categories=0, model_loaded=False, problem=holder.load_error,
        )
    return ReadyResponse(
        status=engine.status, index_version=engine.version, categories=len(engine.resolver.paths),
        indexed_categories=len(engine.indexes), model_loaded=engine.model_loaded, problem=engine.problem,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_text(services: ServicesDep) -> Response:
    return Response(services.metrics.render(), media_type=services.metrics.content_type)


@router.get("/categories", response_model=CategoriesResponse, summary="Categories that can be requested")
async def categories(engine: EngineDep) -> CategoriesResponse:
    return CategoriesResponse(
        index_version=engine.version,
        categories=[
            CategoryInfo(name=engine.resolver.display_name(path), path=path,
                         products=engine.product_counts.get(path, 0), indexed=path in engine.indexes)
            for path in engine.resolver.paths
        ],
    )


@router.post("/admin/reload", response_model=ReloadResponse,
             responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
             summary="Switch atomically to the newest published index version (needs STL_ADMIN_TOKEN)")
async def reload(
    services: ServicesDep,
    _: AdminDep,
    version: Annotated[str | None, Query(description="a specific version; default: the published one")] = None,
    force: Annotated[bool, Query(description="reload even when that version is already served")] = False,
) -> ReloadResponse:
    # The load runs in a thread of its own (see service/threads.py) while other requests keep being served.
    return await run_in_own_thread(lambda: _reload(services, version, force), "stl-reload")


def _reload(services: Services, version: str | None, force: bool) -> ReloadResponse:
    started = time.perf_counter()
    holder, metrics = services.holder, services.metrics
    with holder.reload_lock:
        previous = holder.engine
        target = version or holder.published_version()
        if target is None:
            metrics.reloads.labels(outcome="failed").inc()
            raise HTTPException(409, f"no index version is published under {holder.artifacts}")
        if not force and previous is not None and previous.version == target and previous.status == "ready":
            metrics.reloads.labels(outcome="unchanged").inc()
            return ReloadResponse(status="unchanged", previous_version=target, index_version=target,
                                  ready=previous.status, took_ms=_ms(started))
        try:
            engine = load_engine(services.settings, target)
        except ArtifactError as exc:
            metrics.reloads.labels(outcome="failed").inc()
            raise HTTPException(409, f"reload failed, still serving {_version(previous)}: {exc}") from None
        if engine.status != "ready" and previous is not None and previous.status == "ready":
            metrics.reloads.labels(outcome="refused").inc()
            raise HTTPException(409, f"version {target} cannot serve embeddings ({engine.problem}); "
                                     f"still serving {_version(previous)}")
        holder.swap(engine)
        metrics.set_index(engine.version, engine.status)
        metrics.reloads.labels(outcome="reloaded").inc()
    LOG.info("reloaded: %s -> %s (%s)", _version(previous), engine.version, engine.status)
    return ReloadResponse(status="reloaded", previous_version=previous.version if previous else None,
                          index_version=engine.version, ready=engine.status, took_ms=_ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _version(engine: Engine | None) -> str:
    return engine.version or "none" if engine is not None else "nothing"
