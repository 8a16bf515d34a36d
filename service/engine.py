"""The use cases: `await engine.recommend(image, category, bbox, k, strategy, filter, offset, dedup)`, and
"more like this", product data, thumbnails and facets (`similar`, `product`, `thumbnail`, `facets`), and
shopping a whole photo: `detect` (the items the version's detector finds) and `shop` (every item with its
products: one detector pass, all crops embedded in one batch, each searched in its category).

The engine owns one request's whole path: resolve the category, decide whether popularity must
answer, then decode/crop -> forward pass -> index search through the batcher (whose stages are the
loaded version's `encode_pre` / `encode_core` / `encode_post`), falling back to popularity when the
embedding path breaks. Routes only parse form fields and serialise the `Recommendation`. Filters are parsed
here (400 for the client's mistakes); the search and the catalogue lookup run in the post stage, on the
same thread as the search (service/versions.py).

Where the per-request CPU work runs is deployment policy, decided once in `Engine.start` from the
settings, the device and the runtime (`preprocess_mode`): on a GPU a pool decodes and searches while the
GPU runs forward passes; on a CPU the batcher's own thread decodes, crops, embeds and searches in one go
(with OpenVINO or ONNX Runtime only while it is idle: under load the pool does, beside the forward pass). The
number of forward-pass workers follows the runtime (service/encoder.py): with torch on a CPU one per
intra-op thread, single-threaded under load; with OpenVINO or ONNX Runtime one, on every core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, TypeVar

import numpy as np
from PIL import Image

from index.catalogue import Facets, ProductRecord
from index.filters import Filter, mentions
from service import process
from service.admission import Admission, Unavailable
from service.batching import Batcher, JobExpired
from service.encoder import planned_device, planned_runtime
from service.images import BadInput
from service.metrics import Metrics
from service.schemas import Source, Strategy
from service.search import Page, SearchSpec
from service.settings import Settings
from service.versions import DetectSpec, LoadedVersion, Located, Reloaded, Scene, VersionHolder
from training.data.stl import BBox, UnknownCategory
from training.model.arrays import CropTooSmall, bbox_to_pixels
from training.model.detect_post import Detection, box_iou

LOG = logging.getLogger(__name__)

T = TypeVar("T")

# Predicting a box's category: detections this sure are considered, and the best-overlapping one names the
# category when it overlaps the box this much (else the detector looks at the crop alone).
PREDICT_SCORE_THRESHOLD = 0.05
PREDICT_MIN_IOU = 0.3


class NotServing(RuntimeError):
    """No index version is loaded: still loading (`loading`, worth retrying soon), or none can be."""

    def __init__(self, message: str, loading: bool) -> None:
        super().__init__(message)
        self.loading = loading


class RankedItem(NamedTuple):
    product_id: str
    score: float
    rank: int  # 1-based, continuing across pages (offset 10: the first rank is 11)
    record: ProductRecord | None = None  # the catalogue's data; None for versions without a catalogue


@dataclass(frozen=True)
class Recommendation:
    category: str  # the full category path the items belong to
    source: Source
    fallback_reason: str | None  # why popularity answered instead of embeddings
    items: list[RankedItem]
    index_version: str | None
    offset: int = 0
    note: str | None = None  # why there are no items (nothing matches the filter, past the end)
    category_predicted: bool = False  # the request named no category: the detector chose it
    category_score: float | None = None  # the detector's score for that category


@dataclass(frozen=True)
class Detected:
    items: list[Detection]  # categories as served full paths, best first
    index_version: str | None


@dataclass(frozen=True)
class ShopItem:
    detection: Detection
    recommendation: Recommendation


@dataclass(frozen=True)
class ShopAnswer:
    items: list[ShopItem]
    index_version: str | None
    note: str | None = None  # why there are no items


@dataclass(frozen=True)
class _ShopItem:
    """One detected item on its way through /shop: what to search, or why popularity must answer."""

    detection: Detection
    spec: SearchSpec
    fallback: tuple[str, str] | None  # (metric reason, text) when popularity answers; None: embedded


@dataclass(frozen=True)
class _ShopItems:
    items: list[_ShopItem]  # the items kept (of the requested categories), best first
    detected: bool  # the detector found anything at all (to say why `items` may be empty)
    crops: np.ndarray | None  # [N, 3, S, S]: one per item without a fallback, in the items' order

    def embedding_failed(self, reason: str) -> _ShopItems:
        """Every item that was to be embedded answered by popularity instead."""
        items = [item if item.fallback is not None else replace(item, fallback=("embedding_failed", reason))
                 for item in self.items]
        return _ShopItems(items, self.detected, None)


@dataclass(frozen=True)
class ProductView:
    located: Located
    index_version: str | None


@dataclass(frozen=True)
class FacetsView:
    category: str
    index_version: str | None
    keys: list[str]  # what a filter may use; empty without a catalogue
    facets: Facets | None  # None: the version has no catalogue
    products: int


def batch_workers(settings: Settings) -> int:
    """STL_BATCH_WORKERS, or by default one per intra-op thread with torch on a CPU (see
    service/batching.py), and one on a GPU or with OpenVINO / ONNX Runtime (their own pools use every core)."""
    if settings.batch_workers > 0:
        return settings.batch_workers
    if planned_device(settings) == "cuda" or planned_runtime(settings) != "torch":
        return 1
    return process.torch_threads()


PreprocessMode = Literal["inline", "pool", "adaptive"]


def preprocess_mode(settings: Settings) -> PreprocessMode:
    """Where a request's decode, crop and search run (service/batching.py): STL_PREPROCESS_INLINE true
    (the batcher's thread) or false (the CPU pool); unset, in the pool on a GPU (overlapping its forward
    passes), with torch on a CPU on the batcher's thread (its helpers already keep every core busy), and with
    OpenVINO or ONNX Runtime on a CPU on the batcher's thread while it is idle and in the pool under load."""
    if settings.preprocess_inline is not None:
        return "inline" if settings.preprocess_inline else "pool"
    if planned_device(settings) == "cuda":
        return "pool"
    return "inline" if planned_runtime(settings) == "torch" else "adaptive"


class Engine:
    """The served version (through its holder), the batcher that drives its stages, and the CPU pool."""

    def __init__(self, settings: Settings, metrics: Metrics, holder: VersionHolder, batcher: Batcher,
                 cpu_pool: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.metrics = metrics
        self.holder = holder
        self.batcher = batcher
        # Image checks of popularity answers run here (and, on a GPU, decoding and searching), not in the
        # 40-thread default pool: more threads than cores only adds memory and steals CPU from the forward pass.
        self.cpu_pool = cpu_pool

    @classmethod
    def start(cls, settings: Settings, metrics: Metrics, admission: Admission | None = None) -> Engine:
        """Threads and policy for this deployment; nothing is loaded yet (see `load`). `admission`, when
        given, measures the batcher's queue."""
        with_torch = planned_runtime(settings) == "torch"
        if with_torch:  # otherwise torch is not imported (unless a version without an export needs it)
            process.set_torch_threads(settings.torch_threads)  # before the batcher reads torch's thread count
        workers = batch_workers(settings)
        mode = preprocess_mode(settings)
        torch_helpers = with_torch and workers > 1
        cpu_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="stl-cpu")
        batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000.0,
                          on_batch=metrics.batch_size.observe,
                          on_drop=lambda reason: metrics.dropped.labels(reason=reason).inc(),
                          workers=workers, threads=process.torch_threads() if torch_helpers else 1,
                          set_threads=process.set_thread_torch_threads if torch_helpers else None,
                          pool=None if mode == "inline" else cpu_pool, inline_when_idle=mode == "adaptive")
        if admission is not None:
            admission.attach(batcher)
        return cls(settings, metrics, VersionHolder(settings, metrics), batcher, cpu_pool)

    def load(self) -> None:
        """The start-up load (blocking: run it in a thread of its own, see service/process.py)."""
        self.holder.initial_load()

    def close(self) -> None:
        self.batcher.close()
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    def serving(self) -> LoadedVersion:
        """The version serving now; NotServing while loading or when no artifact could be loaded."""
        loaded = self.holder.current
        if loaded is None:
            if self.holder.loading:
                raise NotServing("the service is still loading its index", loading=True)
            raise NotServing(f"no index artifact is available: {self.holder.load_error}", loading=False)
        return loaded

    def _resolve(self, loaded: LoadedVersion, category: str) -> str:
        try:
            return loaded.resolver.resolve(category)
        except UnknownCategory as exc:
            raise BadInput(400, str(exc)) from None

    async def _in_pool(self, fn: Callable[..., T], *args: object) -> T:
        """Catalogue and search work off the event loop, in the CPU pool."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def _count(self, endpoint: str, spec: SearchSpec) -> None:
        self.metrics.searches.labels(endpoint=endpoint, filtered="true" if spec.filter is not None else "false",
                                     dedup="true" if spec.dedup else "false").inc()

    async def recommend(self, image: bytes, category: str | None, bbox: BBox | None = None, k: int = 10,
                        strategy: Strategy = "auto", filter: str | None = None, offset: int = 0,
                        dedup: bool = True, deadline: float | None = None) -> Recommendation:
        """Products of `category` that go with the item at `bbox` in the scene photo `image`: the page
        `offset .. offset + k` of the exact ranking of the products that pass `filter`. Without a category
        (a bbox given) the version's detector predicts it (`category_predicted` in the answer).

        BadInput for the client's mistakes (unknown category, bad filter, bad image or crop); Unavailable
        when `deadline` (a time.monotonic()) passed while the scene was queued (it was not embedded); every
        other failure of the embedding path is logged, counted and answered by popularity.
        """
        loaded = self.serving()  # read once: the whole request sees one version
        predicted: Detection | None = None
        if category is None:
            if bbox is None:
                raise BadInput(400, "name a category, or give a bbox: its category is then predicted")
            loaded.require_detector()
            predicted = await self._in_pool(self._predict, loaded, image, bbox)
            full_path = predicted.category
        else:
            full_path = self._resolve(loaded, category)
        spec = SearchSpec(full_path, k, offset, loaded.parse_filter(filter), dedup)
        self._count("recommend", spec)
        scene = Scene(image, bbox, spec)
        fallback = loaded.fallback(full_path, strategy)
        page: Page | None = None
        if fallback is not None:
            # Not embedding, but a bad image or crop is still refused; any other error here is a bug.
            await self._in_pool(loaded.check_scene, scene)
        else:
            try:
                page = await self.batcher.run(loaded, scene, deadline)
            except BadInput:
                raise
            except JobExpired:  # too late for this client: a 503, not a popularity answer it no longer waits for
                raise Unavailable("the request's deadline passed while it waited in the queue; retry later") from None
            except Exception as exc:  # the model or index broke on this request: log, count, answer by popularity
                LOG.exception("embedding search failed for category %s; serving popularity", full_path)
                fallback = ("embedding_failed", f"embedding failed: {type(exc).__name__}")
        answer = await self._answer(loaded, spec, page, fallback)
        if predicted is None:
            return answer
        return replace(answer, category_predicted=True, category_score=predicted.score)

    def _detect_spec(self) -> DetectSpec:
        settings = self.settings
        return DetectSpec(settings.detect_score_threshold, settings.detect_nms_threshold, settings.detect_max_items)

    def _detect_photo(self, loaded: LoadedVersion, image: bytes) -> tuple[Image.Image, list[Detection]]:
        picture = loaded.decode(image)
        return picture, loaded.detect(picture, self._detect_spec())

    def _predict(self, loaded: LoadedVersion, image: bytes, bbox: BBox) -> Detection:
        """The category of the item at `bbox`: the detection overlapping it most, else the detector's best
        guess on the crop alone. BadInput 400 when it finds nothing there."""
        picture = loaded.decode(image)
        loose = DetectSpec(PREDICT_SCORE_THRESHOLD, self.settings.detect_nms_threshold,
                           max(self.settings.detect_max_items, 20))
        found = loaded.detect(picture, loose)
        if found:
            overlaps = box_iou(np.asarray([bbox], dtype=np.float32),
                               np.asarray([item.bbox for item in found], dtype=np.float32))[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= PREDICT_MIN_IOU:
                return found[best]
        try:
            crop = picture.crop(bbox_to_pixels(picture.width, picture.height, bbox))
        except CropTooSmall as exc:
            raise BadInput(400, f"the bbox crop is too small: {exc}") from exc
        found = loaded.detect(crop, loose)
        if not found:
            raise BadInput(400, "the detector cannot tell the category of the item in this bbox; name a category")
        return Detection(bbox, found[0].category, found[0].score)

    async def detect(self, image: bytes) -> Detected:
        """The items the version's detector finds in the photo (BadInput 503 when the version has none)."""
        loaded = self.serving()
        loaded.require_detector()
        _, found = await self._in_pool(self._detect_photo, loaded, image)
        return Detected(found, loaded.version)

    async def shop(self, image: bytes, k: int = 10, filter: str | None = None, categories: list[str] | None = None,
                   dedup: bool = True, deadline: float | None = None) -> ShopAnswer:
        """Every item the detector finds in the photo (of `categories`, if given) with its products: one
        detector pass, the items' crops embedded in one batch, each searched in its own category with the
        filter, dedup and in-stock default of `recommend`; popularity answers for an item whose category has
        no index, or when embedding fails.

        Two trips to the CPU pool and one through the batcher, whatever the number of items: the decode,
        detection and every crop in the first, every item's search, catalogue lookup and popularity fallback
        in the last (each thread handoff costs a wake-up, several ms on a busy 2-core machine)."""
        loaded = self.serving()
        loaded.require_detector()
        condition = loaded.parse_filter(filter)
        wanted = None if categories is None else {self._resolve(loaded, name) for name in categories}
        found = await self._in_pool(self._shop_pre, loaded, image, wanted, condition, k, dedup)
        if not found.items:
            note = "no item found in the photo" if not found.detected else "no item of the requested categories found"
            return ShopAnswer([], loaded.version, note)
        for item in found.items:
            self._count("shop", item.spec)
        vectors: np.ndarray | None = None
        if found.crops is not None:
            try:
                vectors = await self.batcher.run_stack(loaded, found.crops, deadline)
            except JobExpired:
                raise Unavailable("the request's deadline passed while it waited in the queue; retry later") from None
            except Exception as exc:  # the model broke: every item answered by popularity
                LOG.exception("embedding the %d items of a photo failed; serving popularity", len(found.crops))
                found = found.embedding_failed(f"embedding failed: {type(exc).__name__}")
        answers = await self._in_pool(self._shop_post, loaded, found, vectors)
        return ShopAnswer(answers, loaded.version)

    def _shop_pre(self, loaded: LoadedVersion, image: bytes, wanted: set[str] | None, condition: Filter | None,
                  k: int, dedup: bool) -> _ShopItems:
        """Decode once, detect, keep the wanted items and crop those that can be embedded (CPU pool)."""
        picture, detected = self._detect_photo(loaded, image)
        chosen = [item for item in detected if wanted is None or item.category in wanted]
        items = [_ShopItem(item, SearchSpec(item.category, k, 0, condition, dedup),
                           loaded.fallback(item.category, "auto")) for item in chosen]
        embeddable = [position for position, item in enumerate(items) if item.fallback is None]
        crops: np.ndarray | None = None
        if embeddable:
            crops, kept = loaded.crops(image, picture, [items[i].detection.bbox for i in embeddable])
            for position in set(embeddable) - {embeddable[i] for i in kept}:
                items[position] = replace(items[position],
                                          fallback=("embedding_failed", "the item's crop is too small"))
        return _ShopItems(items, bool(detected), crops)

    def _shop_post(self, loaded: LoadedVersion, found: _ShopItems, vectors: np.ndarray | None) -> list[ShopItem]:
        """Each item's page: its vector searched in its category, or popularity (CPU pool)."""
        embedded = iter(vectors) if vectors is not None else iter(())
        answers = []
        for item in found.items:
            page: Page | None = None
            fallback = item.fallback
            if fallback is None:  # an item with a crop: its vector is the next one (crops kept the items' order)
                vector = next(embedded)
                try:
                    page = loaded.search_page(vector, item.spec)
                except Exception as exc:  # that item's index broke: popularity answers it
                    LOG.exception("the search of a /shop item failed for category %s; serving popularity",
                                  item.spec.category)
                    fallback = ("embedding_failed", f"embedding failed: {type(exc).__name__}")
            answers.append(ShopItem(item.detection, self._recommendation(loaded, item.spec, page, fallback)))
        return answers

    async def similar(self, product_id: str, k: int = 10, offset: int = 0, filter: str | None = None,
                      dedup: bool = True) -> Recommendation:
        """More like this: the product's own stored vector searched in its category, itself (and with dedup
        its duplicates) left out. BadInput 404 for an unknown product."""
        loaded = self.serving()
        condition = loaded.parse_filter(filter)
        located = await self._in_pool(loaded.locate, product_id)
        if located is None:
            raise BadInput(404, f"unknown product {product_id!r}")
        rows, ids = loaded.exclusions(located, dedup)
        spec = SearchSpec(located.category, k, offset, condition, dedup, rows, ids)
        self._count("similar", spec)
        fallback = loaded.fallback(located.category, "auto")
        page: Page | None = None
        if fallback is None:
            try:
                page = await self._in_pool(loaded.similar_page, located, spec)
            except Exception as exc:  # a broken vectors file or index: answer by popularity, as recommend does
                LOG.exception("similar search failed for product %s; serving popularity", product_id)
                fallback = ("embedding_failed", f"embedding failed: {type(exc).__name__}")
        return await self._answer(loaded, spec, page, fallback)

    async def _answer(self, loaded: LoadedVersion, spec: SearchSpec, page: Page | None,
                      fallback: tuple[str, str] | None) -> Recommendation:
        if page is None:  # the popularity page reads the catalogue: off the event loop
            return await self._in_pool(self._recommendation, loaded, spec, page, fallback)
        return self._recommendation(loaded, spec, page, fallback)

    def _recommendation(self, loaded: LoadedVersion, spec: SearchSpec, page: Page | None,
                        fallback: tuple[str, str] | None) -> Recommendation:
        """The answer for one page, or for popularity's (`page` None: read here, so call it off the loop)."""
        if page is None:
            assert fallback is not None
            self.metrics.fallbacks.labels(reason=fallback[0]).inc()
            page = loaded.popular_page(spec)
        return Recommendation(
            category=spec.category,
            source="embedding" if fallback is None else "popularity",
            fallback_reason=None if fallback is None else fallback[1],
            items=[RankedItem(hit.product_id, hit.score, rank, hit.record)
                   for rank, hit in enumerate(page.hits[:spec.k], spec.offset + 1)],
            index_version=loaded.version,
            offset=spec.offset,
            note=None if page.hits else _empty_note(spec, page.matching),
        )

    async def product(self, product_id: str) -> ProductView:
        loaded = self.serving()
        located = await self._in_pool(loaded.locate, product_id)
        if located is None:
            raise BadInput(404, f"unknown product {product_id!r}")
        return ProductView(located, loaded.version)

    async def thumbnail(self, product_id: str) -> tuple[bytes, str, str]:
        """(bytes, media type, etag) of the product's thumbnail; BadInput 404 when unknown or without one."""
        loaded = self.serving()
        found = await self._in_pool(loaded.thumbnail, product_id)
        if found is None:
            raise BadInput(404, f"no image for product {product_id!r}")
        return found

    async def facets(self, category: str, filter: str | None = None) -> FacetsView:
        """What a filter UI needs for a category: label values and counts, brands, price range, stock."""
        loaded = self.serving()
        full_path = self._resolve(loaded, category)
        condition = loaded.parse_filter(filter)
        facets = await self._in_pool(loaded.facets, full_path, condition)
        keys = sorted(loaded.catalogue.keys()) if loaded.catalogue is not None else []
        return FacetsView(full_path, loaded.version, keys, facets, loaded.product_counts.get(full_path, 0))

    async def reload(self, version: str | None = None, force: bool = False) -> Reloaded:
        """Switch to a published version (ReloadRefused keeps the served one), other requests served meanwhile."""
        # In a thread of its own, whose OpenMP team ends with it (see service/process.py).
        return await process.run_in_own_thread(lambda: self.holder.reload(version, force), "stl-reload")


def _empty_note(spec: SearchSpec, matching: int) -> str | None:
    """Why an answer has no items (None when it simply has none to give)."""
    if matching == 0:
        if spec.filter is None:
            return (f"no product of {spec.category} can be shown: out-of-stock products are left out unless a "
                    "filter mentions in_stock")
        stock = ("" if mentions(spec.filter, "in_stock")
                 else " (out-of-stock products are left out unless it mentions in_stock)")
        return f"no product of {spec.category} matches the filter{stock}"
    if spec.offset > 0:
        return f"offset {spec.offset} is past the end of the results ({matching} matching products)"
    return None
