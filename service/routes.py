"""The HTTP endpoints: parse form fields, call the engine, serialise its answer (no image or index code here)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, Response, UploadFile

from service.deps import AdminDep, EngineDep, ServingEngineDep, VersionDep
from service.images import BadInput, parse_bbox
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
from service.versions import ReloadRefused

LOG = logging.getLogger(__name__)

router = APIRouter()

MAX_K = 100
ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 503)}


@router.post(
    "/recommend", response_model=RecommendResponse, responses=ERRORS,
    summary="Products of one category that go with the item in a scene photo",
)
async def recommend(
    request: Request,
    engine: ServingEngineDep,
    image: Annotated[UploadFile, File(description="scene photo: JPEG, PNG or WebP")],
    category: Annotated[str, Form(description="short name ('Shoes') or full path ('Apparel & Accessories|Shoes')")],
    bbox: Annotated[str | None, Form(description="'left,top,right,bottom' in [0,1], origin top-left")] = None,
    k: Annotated[int, Form(ge=1, le=MAX_K, description="number of products")] = 10,
    strategy: Annotated[Strategy, Form(description="auto: embeddings with fallback; popularity")] = "auto",
) -> Response:
    started = time.perf_counter()
    box = parse_bbox(bbox)
    limit = engine.settings.max_upload_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise BadInput(413, f"the image is larger than STL_MAX_UPLOAD_MB = {engine.settings.max_upload_mb} MB")
    answer = await engine.recommend(data, category, box, k, strategy)
    request.state.source = answer.source
    body = RecommendResponse(
        category=answer.category,
        source=answer.source,
        fallback_reason=answer.fallback_reason,
        items=[Item(product_id=item.product_id, score=item.score, rank=item.rank) for item in answer.items],
        index_version=answer.index_version,
        took_ms=round((time.perf_counter() - started) * 1000.0, 3),
    )
    # Serialised here: returned as a model, FastAPI would validate it a second time against response_model.
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Ready to serve: 'ready', or 'degraded' (popularity only); 503 while loading")
async def readyz(engine: EngineDep, response: Response) -> ReadyResponse:
    holder = engine.holder
    loaded = holder.current
    if loaded is None:
        response.status_code = 503
        return ReadyResponse(
            status="loading" if holder.loading else "unavailable", index_version=None, categories=0,
            indexed_categories=0, model_loaded=False, problem=holder.load_error,
        )
    return ReadyResponse(
        status=loaded.status, index_version=loaded.version, categories=len(loaded.resolver.paths),
        indexed_categories=len(loaded.indexes), model_loaded=loaded.model_loaded, problem=loaded.problem,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_text(engine: EngineDep) -> Response:
    return Response(engine.metrics.render(), media_type=engine.metrics.content_type)


@router.get("/categories", response_model=CategoriesResponse, summary="Categories that can be requested")
async def categories(loaded: VersionDep) -> CategoriesResponse:
    return CategoriesResponse(
        index_version=loaded.version,
        categories=[
            CategoryInfo(name=loaded.resolver.display_name(path), path=path,
                         products=loaded.product_counts.get(path, 0), indexed=path in loaded.indexes)
            for path in loaded.resolver.paths
        ],
    )


@router.post("/admin/reload", response_model=ReloadResponse,
             responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
             summary="Switch atomically to the newest published index version (needs STL_ADMIN_TOKEN)")
async def reload(
    engine: EngineDep,
    _: AdminDep,
    version: Annotated[str | None, Query(description="a specific version; default: the published one")] = None,
    force: Annotated[bool, Query(description="reload even when that version is already served")] = False,
) -> ReloadResponse:
    try:
        done = await engine.reload(version, force)  # other requests keep being served meanwhile
    except ReloadRefused as exc:
        raise HTTPException(409, str(exc)) from None
    return ReloadResponse(status=done.status, previous_version=done.previous_version,
                          index_version=done.index_version, ready=done.ready, took_ms=done.took_ms)
