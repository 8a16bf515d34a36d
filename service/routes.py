"""The HTTP endpoints: parse form fields, call the engine, serialise its answer (no image or index code here)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, HTTPException, Path, Query, Request, Response, UploadFile

from service.admission import Admission
from service.deps import AdminDep, EngineDep, Protected, ServingEngineDep, VersionDep
from service.engine import RankedItem, Recommendation, ShopAnswer
from service.images import BadInput, parse_bbox
from service.schemas import (
    CategoriesResponse,
    CategoryInfo,
    DetectedItem,
    DetectResponse,
    ErrorResponse,
    FacetsResponse,
    FollowInfo,
    HealthResponse,
    Item,
    PriceRange,
    ProductResponse,
    ReadyResponse,
    RecommendResponse,
    ReloadResponse,
    ShopItemResponse,
    ShopResponse,
    Strategy,
    product_fields,
)
from service.versions import ReloadRefused

LOG = logging.getLogger(__name__)

router = APIRouter()

MAX_K = 100
MAX_OFFSET = 1000
# 401 and 429 only when STL_API_KEYS / STL_RATE_LIMIT are set (service/access.py).
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 429, 503)}
LOOKUP_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}
# Thumbnails change only with a new index version; the ETag (a content hash) revalidates them after that.
THUMBNAIL_CACHE_CONTROL = "public, max-age=3600"

FILTER_HELP = (
    "only products matching this, e.g. `brand=acme AND (colour=red OR colour=\"dark blue\") AND price<=80`: "
    "key=value, key!=value, price with <, <=, >, >=, in_stock=true|false, AND, OR, NOT, parentheses; keys are "
    "brand, price, in_stock and the catalogue's label keys (GET /facets lists them). Out-of-stock products are "
    "left out unless the filter mentions in_stock. Unknown key or bad syntax: 400"
)
OFFSET_HELP = "items to skip: offset 10 with k 10 returns items 11-20 of the same ranking"
DEDUP_HELP = "show each group of duplicate products once (its most popular member); false shows them all"


@router.post(
    "/recommend", response_model=RecommendResponse, responses=ERRORS, dependencies=[Protected],
    summary="Products of one category that go with the item in a scene photo",
)
async def recommend(
    request: Request,
    engine: ServingEngineDep,
    image: Annotated[UploadFile, File(description="scene photo: JPEG, PNG or WebP")],
    category: Annotated[str | None, Form(description="short name ('Shoes') or full path ('Apparel & Accessories|"
                                                     "Shoes'); omitted with a bbox: the item detector predicts "
                                                     "it")] = None,
    bbox: Annotated[str | None, Form(description="'left,top,right,bottom' in [0,1], origin top-left")] = None,
    k: Annotated[int, Form(ge=1, le=MAX_K, description="number of products")] = 10,
    strategy: Annotated[Strategy, Form(description="auto: embeddings with fallback; popularity")] = "auto",
    filter: Annotated[str | None, Form(description=FILTER_HELP)] = None,
    offset: Annotated[int, Form(ge=0, le=MAX_OFFSET, description=OFFSET_HELP)] = 0,
    dedup: Annotated[bool, Form(description=DEDUP_HELP)] = True,
) -> Response:
    started = time.perf_counter()
    box = parse_bbox(bbox)
    if category is None and box is None:  # the category may be left out only when a box can be predicted
        raise HTTPException(422, [{"loc": ["body", "category"], "type": "missing",
                                   "msg": "Field required (or give a bbox: its category is then predicted)"}])
    data = await _upload(engine, image)
    # The admission gate (service/middleware.py) set the deadline; absent only for an app without the gate.
    deadline = getattr(request.state, "deadline", None)
    answer = await engine.recommend(data, category, box, k, strategy, filter, offset, dedup, deadline)
    request.state.source = answer.source
    return _recommendation(answer, started)


@router.get("/products/{product_id}", response_model=ProductResponse, responses=LOOKUP_ERRORS, dependencies=[Protected],
            summary="One product's catalogue data (404 for an unknown id)")
async def product(engine: ServingEngineDep, product_id: Annotated[str, Path()]) -> ProductResponse:
    view = await engine.product(product_id)
    return ProductResponse.of(view.located.product_id, view.located.category, view.located.record,
                              view.index_version)


@router.get("/products/{product_id}/image", response_class=Response, dependencies=[Protected], responses={
    200: {"content": {"image/webp": {}, "image/jpeg": {}}, "description": "the thumbnail"},
    304: {"description": "the thumbnail named by If-None-Match is still current"}, **LOOKUP_ERRORS},
    summary="A product's thumbnail, with an ETag (answers 304 to a matching If-None-Match)")
async def product_image(
    engine: ServingEngineDep,
    product_id: Annotated[str, Path()],
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    data, media_type, etag = await engine.thumbnail(product_id)
    headers = {"ETag": f'"{etag}"', "Cache-Control": THUMBNAIL_CACHE_CONTROL}
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


@router.get("/products/{product_id}/similar", response_model=RecommendResponse, responses=LOOKUP_ERRORS,
            dependencies=[Protected],
            summary="More like this: products of the same category closest to this one (itself left out)")
async def similar(
    request: Request,
    engine: ServingEngineDep,
    product_id: Annotated[str, Path()],
    k: Annotated[int, Query(ge=1, le=MAX_K, description="number of products")] = 10,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description=OFFSET_HELP)] = 0,
    filter: Annotated[str | None, Query(description=FILTER_HELP)] = None,
    dedup: Annotated[bool, Query(description=DEDUP_HELP)] = True,
) -> Response:
    started = time.perf_counter()
    answer = await engine.similar(product_id, k, offset, filter, dedup)
    request.state.source = answer.source
    return _recommendation(answer, started)


@router.get("/facets", response_model=FacetsResponse, responses=LOOKUP_ERRORS, dependencies=[Protected],
            summary="What a filter UI needs for a category: label values with counts, brands, price range, stock")
async def facets(
    engine: ServingEngineDep,
    category: Annotated[str, Query(description="short name or full path")],
    filter: Annotated[str | None, Query(description="count only the products matching this (same syntax as "
                                                    "/recommend, without the in-stock default)")] = None,
) -> FacetsResponse:
    view = await engine.facets(category, filter)
    found = view.facets
    if found is None:  # a version without a catalogue: only the count is known
        return FacetsResponse(category=view.category, index_version=view.index_version, keys=[],
                              products=view.products, in_stock=None, price=PriceRange(min=None, max=None),
                              brands={}, labels={})
    return FacetsResponse(category=view.category, index_version=view.index_version, keys=view.keys,
                          products=found.total, in_stock=found.in_stock,
                          price=PriceRange(min=found.price_min, max=found.price_max),
                          brands=dict(found.brands), labels={key: dict(values) for key, values in found.labels.items()})


@router.post(
    "/detect", response_model=DetectResponse, responses=ERRORS, dependencies=[Protected],
    summary="The items in a scene photo: boxes, categories and scores (503 without a detector in the version)",
)
async def detect(
    engine: ServingEngineDep,
    image: Annotated[UploadFile, File(description="scene photo: JPEG, PNG or WebP")],
) -> Response:
    started = time.perf_counter()
    found = await engine.detect(await _upload(engine, image))
    body = DetectResponse(items=[DetectedItem(bbox=list(item.bbox), category=item.category, score=item.score)
                                 for item in found.items],
                          index_version=found.index_version, took_ms=_ms(started))
    return Response(body.model_dump_json(), media_type="application/json")


@router.post(
    "/shop", response_model=ShopResponse, responses=ERRORS, dependencies=[Protected],
    summary="Shop the whole look: every item in a scene photo with its products, in one answer",
)
async def shop(
    request: Request,
    engine: ServingEngineDep,
    image: Annotated[UploadFile, File(description="scene photo: JPEG, PNG or WebP")],
    k: Annotated[int, Form(ge=1, le=MAX_K, description="products per item")] = 10,
    filter: Annotated[str | None, Form(description=FILTER_HELP)] = None,
    categories: Annotated[str | None, Form(description="comma-separated category names or paths: only items "
                                                        "of these")] = None,
    dedup: Annotated[bool, Form(description=DEDUP_HELP)] = True,
) -> Response:
    started = time.perf_counter()
    names = None if categories is None or not categories.strip() else [
        name.strip() for name in categories.split(",") if name.strip()]
    data = await _upload(engine, image)
    answer = await engine.shop(data, k, filter, names, dedup, getattr(request.state, "deadline", None))
    return Response(_shop(answer, started).model_dump_json(), media_type="application/json")


async def _upload(engine: EngineDep, image: UploadFile) -> bytes:
    limit = engine.settings.max_upload_bytes
    data = await image.read(limit + 1)
    if len(data) > limit:
        raise BadInput(413, f"the image is larger than STL_MAX_UPLOAD_MB = {engine.settings.max_upload_mb} MB")
    return data


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _shop(answer: ShopAnswer, started: float) -> ShopResponse:
    return ShopResponse(
        items=[ShopItemResponse(bbox=list(item.detection.bbox), category=item.detection.category,
                                score=item.detection.score,
                                products=[_item(product) for product in item.recommendation.items],
                                source=item.recommendation.source,
                                fallback_reason=item.recommendation.fallback_reason, note=item.recommendation.note)
               for item in answer.items],
        note=answer.note, index_version=answer.index_version, took_ms=_ms(started))


def _item(item: RankedItem) -> Item:
    return Item(**product_fields(item.product_id, item.record), rank=item.rank, score=item.score)


def _recommendation(answer: Recommendation, started: float) -> Response:
    body = RecommendResponse(
        category=answer.category,
        source=answer.source,
        fallback_reason=answer.fallback_reason,
        items=[_item(item) for item in answer.items],
        offset=answer.offset,
        note=answer.note,
        index_version=answer.index_version,
        took_ms=_ms(started),
        category_predicted=answer.category_predicted,
        category_score=answer.category_score,
    )
    # Serialised here: returned as a model, FastAPI would validate it a second time against response_model.
    return Response(body.model_dump_json(), media_type="application/json")


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names this ETag (weak comparison, as RFC 9110 asks for GET)."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == f'"{etag}"' for tag in if_none_match.split(","))


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Ready to serve: 'ready', or 'degraded' (popularity only); 503 while loading or draining")
async def readyz(request: Request, engine: EngineDep, response: Response) -> ReadyResponse:
    holder = engine.holder
    loaded = holder.current
    admission: Admission = request.app.state.admission
    runtime = loaded.encoder.description if loaded is not None and loaded.encoder is not None else None
    torch_loaded = "torch" in sys.modules  # a process serving an export should never have imported it
    follower = getattr(request.app.state, "follower", None)
    follow = FollowInfo(poll_s=follower.poll_s, seen=follower.seen) if follower is not None else None
    if admission.draining:  # shutting down: orchestrators take this instance out of rotation
        response.status_code = 503
        return ReadyResponse(
            status="draining", index_version=loaded.version if loaded else None,
            categories=len(loaded.resolver.paths) if loaded else 0,
            indexed_categories=len(loaded.indexes) if loaded else 0,
            model_loaded=loaded.model_loaded if loaded else False, problem="the service is shutting down",
            runtime=runtime, torch_loaded=torch_loaded, follow=follow,
        )
    if loaded is None:
        response.status_code = 503
        return ReadyResponse(
            status="loading" if holder.loading else "unavailable", index_version=None, categories=0,
            indexed_categories=0, model_loaded=False, problem=holder.load_error, torch_loaded=torch_loaded,
            follow=follow,
        )
    return ReadyResponse(
        status=loaded.status, index_version=loaded.version, categories=len(loaded.resolver.paths),
        indexed_categories=len(loaded.indexes), model_loaded=loaded.model_loaded, problem=loaded.problem,
        runtime=runtime, torch_loaded=torch_loaded,
        detector=loaded.detector.name if loaded.detector is not None else None,
        detector_precision=loaded.detector.precision if loaded.detector is not None else None,
        detector_problem=loaded.detector_problem, follow=follow,
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
