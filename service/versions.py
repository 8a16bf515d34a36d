"""Index versions: one loaded version (scene encoder + per-category indexes + catalogue + popularity), and the
holder that serves one and swaps it on a reload.

A `LoadedVersion` is built completely off to the side and never mutated afterwards; a hot reload
replaces the holder's single reference. A request reads that reference once and uses the same version
until it answers, so it can never see half of one version and half of another.

A loaded version is also the model the batcher drives (service/batching.py): `encode_pre` decodes and
crops one scene, `encode_core` embeds a stack of crops (its `SceneEncoder`: the version's exported model in
OpenVINO, or torch; service/encoder.py), `encode_post` searches one category's index
(filtered, paged, deduplicated: service/search.py) and looks the hits up in the catalogue.

A version may carry an item detector (`detector/`: its ONNX graph, run by OpenVINO or ONNX Runtime with
numpy decoding, `training.model.detect_post`; never torch). Without one, or when it cannot be loaded, the
version serves everything but /detect and /shop, and `detector_problem` says why.

The catalogue (SQLite, read-only) is opened at load and belongs to its version. A reload never closes the
previous version's catalogue: a request that read the old version may still be using it. It is left to the
garbage collector, which closes its connections once the last request holding that version is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
from PIL import Image

from index.ann import is_compressed
from index.artifact import Artifact, ArtifactError, CategoryIndex, current_version, open_artifact
from index.catalogue import Catalogue, CatalogueError, Facets, ProductRecord
from index.filters import Filter, FilterError, parse_filter
from service.encoder import SceneEncoder, load_encoder, runtime_precision, runtime_threads
from service.images import BadInput, decode_image
from service.metrics import Metrics
from service.process import FaissThreads
from service.search import CategorySearch, Groups, Hit, Page, Rerank, RowPage, SearchSpec
from service.settings import Settings
from training.data.stl import BBox, CategoryResolver, UnknownCategory
from training.model.arrays import CropTooSmall, bbox_to_pixels
from training.model.detect_post import Detection, DetectorGraph

LOG = logging.getLogger(__name__)

Status = Literal["ready", "degraded"]


class PopularityTable(Protocol):
    def top(self, category: str, k: int) -> list[tuple[str, float]]: ...

    def categories(self) -> list[str]: ...


@dataclass(frozen=True)
class Scene:
    """One request's input to the stages: the upload, the item's box and what to search for."""

    image: bytes
    bbox: BBox | None
    search: SearchSpec


@dataclass(frozen=True)
class DetectSpec:
    """The detector's thresholds for one request (STL_DETECT_*)."""

    score_threshold: float
    nms_threshold: float
    max_items: int


@dataclass(frozen=True)
class Located:
    """Where a product sits: its category and row in that category's index, and its catalogue record."""

    product_id: str
    category: str
    row: int
    record: ProductRecord | None  # None: the version has no catalogue


class StoredVectors:
    """Each category's stored index rows ("more like this", re-ranking), memory-mapped read-only on first use:
    only the rows asked for are read, so a 10M-row category costs no 5 GB of RAM."""

    def __init__(self, artifact: Artifact) -> None:
        self._artifact = artifact
        self._lock = threading.Lock()
        self._loaded: dict[str, np.ndarray] = {}

    def rows(self, category: str) -> np.ndarray:
        with self._lock:  # two first requests must not map the same file twice
            vectors = self._loaded.get(category)
            if vectors is None:
                vectors = self._loaded[category] = self._artifact.read_vectors(category, mmap=True)
        return vectors

    def row(self, category: str, row: int) -> np.ndarray:
        return np.array(self.rows(category)[row])


@dataclass(frozen=True)
class LoadedVersion:
    version: str | None
    product_counts: Mapping[str, int]  # full path -> products in the catalogue
    resolver: CategoryResolver
    popularity: PopularityTable | None
    encoder: SceneEncoder | None
    indexes: Mapping[str, CategoryIndex] = field(default_factory=dict)
    searches: Mapping[str, CategorySearch] = field(default_factory=dict)  # one per index: filtered, paged, dedup
    catalogue: Catalogue | None = None  # None: built before catalogues (or unreadable); items carry nulls
    vectors: StoredVectors | None = None
    locations: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # id -> (category, row) w/o catalogue
    problem: str | None = None  # why embeddings cannot be served (the service is then degraded)
    max_image_pixels: int = Settings.model_fields["max_image_pixels"].default
    search_threads: FaissThreads = field(
        default_factory=lambda: FaissThreads(Settings.model_fields["faiss_threads"].default))
    loaded_at: float = field(default_factory=time.time)
    detector: DetectorGraph | None = None  # the item detector (/detect, /shop), None: the version has none
    detector_problem: str | None = None  # why there is no detector

    def require_detector(self) -> DetectorGraph:
        """The version's detector; BadInput 503 naming why there is none."""
        if self.detector is None:
            raise BadInput(503, self.detector_problem or f"index version {self.version} has no item detector")
        return self.detector

    def detect(self, picture: Image.Image, spec: DetectSpec) -> list[Detection]:
        """The items the detector finds in a decoded photo, best first, their categories as served paths;
        categories this version cannot resolve are left out."""
        detector = self.require_detector()
        try:
            found = detector.detect([picture], spec.score_threshold, spec.nms_threshold, spec.max_items)[0]
        except CropTooSmall as exc:  # the detector resizes the whole photo: a 500x3 one has no rows to look at
            raise BadInput(400, f"the photo is too small to find items in: {exc}") from exc
        served = []
        for item in found:
            try:
                served.append(Detection(item.bbox, self.resolver.resolve(item.category), item.score))
            except UnknownCategory:
                continue
        return served

    def decode(self, image: bytes) -> Image.Image:
        """The upload decoded (the index build's decoder); BadInput for a bad or oversized image."""
        return decode_image(image, self.max_image_pixels)

    def crops(self, image: bytes, picture: Image.Image, boxes: list[BBox]) -> tuple[np.ndarray | None, list[int]]:
        """[N, 3, S, S] crops of the items at `boxes` of one photo, and which boxes they are (a box too small
        to embed is left out)."""
        assert self.encoder is not None
        crops, kept = [], []
        for position, box in enumerate(boxes):
            try:
                crops.append(self.encoder.crop_of(image, picture, box, self.max_image_pixels))
            except CropTooSmall:
                continue
            kept.append(position)
        return (np.stack(crops) if crops else None), kept

    @property
    def model_loaded(self) -> bool:
        return self.encoder is not None and bool(self.indexes)

    @property
    def status(self) -> Status:
        return "ready" if self.model_loaded and self.problem is None else "degraded"

    def fallback(self, category: str, strategy: str) -> tuple[str, str] | None:
        """(metric reason, text for the client) when popularity must answer, else None."""
        if strategy == "popularity":
            return "strategy", "popularity strategy requested"
        if not self.model_loaded:
            return "model_unavailable", f"no valid model/index is loaded: {self.problem}"
        if category not in self.indexes:
            return "no_index", f"category {category!r} has no embedding index"
        return None

    def popular(self, category: str, k: int) -> list[tuple[str, float]]:
        if self.popularity is None:
            return []
        try:
            return self.popularity.top(category, k)
        except KeyError:  # a category the table does not know has no popular products to offer
            return []

    def parse_filter(self, text: str | None) -> Filter | None:
        """The request's filter (None when blank); BadInput 400 naming the position or listing the keys."""
        if text is None or not text.strip():
            return None
        if self.catalogue is None:
            raise BadInput(400, f"filters need a product catalogue; index version {self.version} has none "
                                "(built before catalogues): rebuild it with `python -m index build`")
        try:
            return parse_filter(text, self.catalogue.label_keys())
        except FilterError as exc:
            raise BadInput(400, str(exc)) from None

    def allowed_rows(self, category: str, condition: Filter | None) -> np.ndarray | None:
        """Rows that pass the filter and the in-stock default; None (all rows) without a catalogue."""
        return None if self.catalogue is None else self.catalogue.allowed_rows(category, condition)

    def search_page(self, vector: np.ndarray, spec: SearchSpec) -> Page:
        """The exact filtered page for a query vector, looked up in the catalogue."""
        search = self.searches[spec.category]
        allowed = self.allowed_rows(spec.category, spec.filter)
        rows: RowPage = self.search_threads.call(search.page, np.asarray(vector)[None, :], spec, allowed)
        ids = search.index.product_ids
        hit_rows = [row for row, _ in rows.hits]
        records = (self.catalogue.by_rows(spec.category, hit_rows) if self.catalogue is not None
                   else [None] * len(hit_rows))
        return Page([Hit(ids[row], score, record)
                     for (row, score), record in zip(rows.hits, records, strict=True)], rows.matching)

    def popular_page(self, spec: SearchSpec) -> Page:
        """The popularity fallback for the same page, honouring the filter, dedup and exclusions."""
        want = spec.offset + spec.k + len(spec.exclude_ids)  # from the top, so that exclusions never shift pages
        if self.catalogue is None:
            ranked = [Hit(pid, score, None) for pid, score in self.popular(spec.category, want)
                      if pid not in spec.exclude_ids]
            matching = self.product_counts.get(spec.category, 0) - len(spec.exclude_ids)
        else:
            records = self.catalogue.popular(spec.category, spec.filter, want, one_per_group=spec.dedup)
            ranked = [Hit(record.id, float(record.popularity), record) for record in records
                      if record.id not in spec.exclude_ids]
            allowed = self.catalogue.allowed_rows(spec.category, spec.filter)
            matching = len(allowed) - int(np.isin(np.asarray(spec.exclude_rows, dtype=np.int64), allowed).sum())
        return Page(ranked[spec.offset:spec.offset + spec.k], max(0, matching))

    def locate(self, product_id: str) -> Located | None:
        if self.catalogue is not None:
            record = self.catalogue.product(product_id)
            return None if record is None else Located(record.id, record.category, record.row, record)
        found = self.locations.get(product_id)
        return None if found is None else Located(product_id, found[0], found[1], None)

    def exclusions(self, located: Located, dedup: bool) -> tuple[tuple[int, ...], frozenset[str]]:
        """What a "more like this" never answers, as rows and ids: the product, and with dedup its whole group."""
        search = self.searches.get(located.category)
        if dedup and search is not None and search.groups is not None:
            rows = tuple(int(row) for row in search.groups.members_of(located.row))
            return rows, frozenset(search.index.product_ids[row] for row in rows)
        return (located.row,), frozenset({located.product_id})

    def similar_page(self, located: Located, spec: SearchSpec) -> Page:
        """More like this: the product's own stored vector searched in its category."""
        assert self.vectors is not None
        return self.search_page(self.vectors.row(located.category, located.row), spec)

    def facets(self, category: str, condition: Filter | None) -> Facets | None:
        return None if self.catalogue is None else self.catalogue.facets(category, condition)

    def thumbnail(self, product_id: str) -> tuple[bytes, str, str] | None:
        return None if self.catalogue is None else self.catalogue.thumbnail(product_id)

    def check_scene(self, scene: Scene) -> None:
        """Refuse a bad image or crop (BadInput) without embedding it: popularity answers need valid input too."""
        try:
            picture = decode_image(scene.image, self.max_image_pixels)
            bbox_to_pixels(picture.width, picture.height, scene.bbox)  # the same crop-size rule, no tensor needed
        except CropTooSmall as exc:
            raise BadInput(400, f"the bbox crop is too small to embed: {exc}") from exc

    def encode_pre(self, scene: Scene) -> np.ndarray:
        """Decode and crop: the [3, S, S] array of the scene's item (BadInput for the client's mistakes)."""
        assert self.encoder is not None
        try:
            # The index build's own decoder and preprocessing (to_array): exactly the pixels it saw.
            return self.encoder.crop(scene.image, scene.bbox, self.max_image_pixels)
        except CropTooSmall as exc:
            raise BadInput(400, f"the bbox crop is too small to embed: {exc}") from exc

    def encode_core(self, batch: np.ndarray) -> np.ndarray:
        assert self.encoder is not None
        return self.encoder.embed(batch)

    def encode_post(self, scene: Scene, vector: np.ndarray) -> Page:
        """The scene's page of its category (filtered, deduplicated), with the products' catalogue data."""
        return self.search_page(vector, scene.search)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_version(settings: Settings, version: str | None = None) -> LoadedVersion:
    """Load a version (None: the pinned one, else `current`) fully before anyone can see it.

    Raises ArtifactError only when no artifact can be opened at all. A model or index that is
    missing, corrupt or mismatched yields a degraded version that still serves popularity.
    """
    started = time.perf_counter()
    artifact = open_artifact(settings.artifacts, version or settings.index_version)
    problems: list[str] = []
    popularity: PopularityTable | None = None
    try:
        popularity = artifact.popularity
    except Exception as exc:  # a broken table costs the fallback, not the service
        LOG.exception("popularity table of version %s is unusable", artifact.version)
        problems.append(f"popularity unavailable ({_describe(exc)})")
    encoder: SceneEncoder | None = None
    indexes: dict[str, CategoryIndex] = {}
    searches: dict[str, CategorySearch] = {}
    stored = StoredVectors(artifact)
    try:
        encoder = load_encoder(settings, artifact)  # checked against the embedder the indexes were built with
        indexes = artifact.load_indexes()
        searches = {category: CategorySearch(index, rerank=_rerank(settings, artifact, stored, category))
                    for category, index in indexes.items()}
        encoder.warm_up(settings.batch_max_size)  # the shapes the batcher sends under load
    except Exception as exc:  # missing, corrupt or mismatched: degrade to popularity, keep serving
        LOG.error("version %s cannot serve embeddings, falling back to popularity: %s", artifact.version,
                  _describe(exc))
        problems.insert(0, f"embeddings unavailable ({_describe(exc)})")
        encoder, indexes, searches = None, {}, {}
    catalogue: Catalogue | None = None
    try:
        catalogue = _open_catalogue(artifact, searches)
    except Exception as exc:  # a broken catalogue costs product data and filters, not the search
        LOG.exception("catalogue of version %s is unusable", artifact.version)
        problems.append(f"catalogue unavailable ({_describe(exc)})")
    locations = _locations(artifact) if catalogue is None else {}
    detector, detector_problem = _load_detector(settings, artifact)
    paths = set(artifact.categories) | set(indexes)
    if popularity is not None:
        paths |= set(popularity.categories())
    loaded = LoadedVersion(
        version=artifact.version,
        product_counts=dict(artifact.categories),
        resolver=CategoryResolver(paths),
        popularity=popularity,
        encoder=encoder,
        indexes=indexes,
        searches=searches,
        catalogue=catalogue,
        vectors=stored,
        locations=locations,
        problem="; ".join(problems) or None,
        max_image_pixels=settings.max_image_pixels,
        search_threads=FaissThreads(settings.faiss_threads),
        detector=detector,
        detector_problem=detector_problem,
    )
    LOG.info("loaded index version %s (%s, %d categories, %d indexed) in %.2fs", loaded.version, loaded.status,
             len(paths), len(indexes), time.perf_counter() - started)
    if encoder is not None:
        LOG.info("serving with runtime %s", encoder.description)
    return loaded


def _rerank(settings: Settings, artifact: Artifact, stored: StoredVectors, category: str) -> Rerank | None:
    """Re-ranking for a category whose index scores by compressed codes (None: exact scores already, or
    STL_RERANK_CANDIDATES=0)."""
    if settings.rerank_candidates == 0 or not is_compressed(artifact.entry(category).factory):
        return None
    return Rerank(stored.rows(category), settings.rerank_candidates)


def _load_detector(settings: Settings, artifact: Artifact) -> tuple[DetectorGraph | None, str | None]:
    """The version's item detector in a torch-free runtime, or None and why: a version without one, or with a
    broken one, still serves everything else."""
    folder = artifact.detector_dir
    if folder is None:
        return None, (f"index version {artifact.version} has no item detector: build it with "
                      "`python -m index build --detector PATH` (or `python -m index pipeline`)")
    runtime = settings.runtime if settings.runtime in ("openvino", "onnxruntime") else "auto"
    try:
        detector = DetectorGraph(folder, runtime, runtime_threads(settings),
                                 precision=runtime_precision(settings.detect_precision))
        detector.warm_up()
    except Exception as exc:  # a broken detector costs /detect and /shop, not the search
        LOG.error("the item detector of version %s is unusable: %s", artifact.version, _describe(exc))
        return None, f"the item detector is unavailable ({_describe(exc)})"
    LOG.info("item detector: %s, %d categories, %d px", detector.description, len(detector.categories),
             detector.image_size)
    return detector, None


def _open_catalogue(artifact: Artifact, searches: Mapping[str, CategorySearch]) -> Catalogue | None:
    """The version's catalogue (None for versions built before catalogues), checked against the indexes,
    its dedup groups attached to each category's search."""
    path = artifact.catalogue_path
    if path is None:
        LOG.info("version %s has no catalogue: answers carry product ids only, filters are refused",
                 artifact.version)
        return None
    catalogue = Catalogue.open(path)
    try:
        for category, search in searches.items():
            records = catalogue.by_rows(category, range(search.size))
            if [record.id for record in records] != search.index.product_ids:
                raise CatalogueError(f"{path}: the products of category {category!r} are not in its index's order")
            search.groups = Groups.of([record.group_id for record in records],
                                      [record.popularity for record in records])
    except BaseException:
        catalogue.close()
        for search in searches.values():
            search.groups = None
        raise
    return catalogue


def _locations(artifact: Artifact) -> dict[str, tuple[str, int]]:
    """Product id -> (category, row) from the id files, for versions without a catalogue."""
    found: dict[str, tuple[str, int]] = {}
    for category in artifact.categories:
        try:
            ids = artifact.read_ids(category)
        except ArtifactError as exc:
            LOG.warning("version %s: ids of %r unreadable: %s", artifact.version, category, exc)
            continue
        found.update((product_id, (category, row)) for row, product_id in enumerate(ids))
    return found


class ReloadRefused(RuntimeError):
    """A reload that did not happen (nothing published, unreadable, or worse than what is served)."""


@dataclass(frozen=True)
class Reloaded:
    status: Literal["reloaded", "unchanged"]
    previous_version: str | None
    index_version: str | None
    ready: Status
    took_ms: float


class VersionHolder:
    """The version being served; `current` is read once per request, `swap` replaces it in one assignment."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.artifacts = settings.artifacts
        self._current: LoadedVersion | None = None
        self.loading = True
        self.load_error: str | None = None
        # One reload at a time: two concurrent ones would load the same version twice for nothing.
        self.reload_lock = threading.Lock()

    @property
    def current(self) -> LoadedVersion | None:
        return self._current

    def swap(self, loaded: LoadedVersion) -> LoadedVersion | None:
        previous, self._current = self._current, loaded
        self.load_error = None
        return previous

    def published_version(self) -> str | None:
        return current_version(self.artifacts)

    def initial_load(self) -> None:
        """Start-up load; with no artifact at all the service still starts and says why it is unavailable."""
        try:
            self.swap(load_version(self.settings))
        except ArtifactError as exc:
            self.load_error = str(exc)
            LOG.error("no index artifact can be served: %s", exc)
        finally:
            self.loading = False
        loaded = self._current
        self.metrics.set_index(loaded.version if loaded else None, loaded.status if loaded else "unavailable")

    def reload(self, version: str | None = None, force: bool = False) -> Reloaded:
        """Switch to `version` (default: the published one); ReloadRefused keeps the served one."""
        started = time.perf_counter()
        metrics = self.metrics
        with self.reload_lock:
            previous = self._current
            target = version or self.published_version()
            if target is None:
                metrics.reloads.labels(outcome="failed").inc()
                raise ReloadRefused(f"no index version is published under {self.artifacts}")
            if not force and previous is not None and previous.version == target and previous.status == "ready":
                metrics.reloads.labels(outcome="unchanged").inc()
                return Reloaded("unchanged", target, target, previous.status, _ms(started))
            try:
                loaded = load_version(self.settings, target)
            except ArtifactError as exc:
                metrics.reloads.labels(outcome="failed").inc()
                raise ReloadRefused(f"reload failed, still serving {_name(previous)}: {exc}") from None
            if loaded.status != "ready" and previous is not None and previous.status == "ready":
                metrics.reloads.labels(outcome="refused").inc()
                raise ReloadRefused(f"version {target} cannot serve embeddings ({loaded.problem}); "
                                    f"still serving {_name(previous)}")
            self.swap(loaded)
            metrics.set_index(loaded.version, loaded.status)
            metrics.reloads.labels(outcome="reloaded").inc()
        LOG.info("reloaded: %s -> %s (%s)", _name(previous), loaded.version, loaded.status)
        return Reloaded("reloaded", previous.version if previous else None, loaded.version, loaded.status,
                        _ms(started))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def _name(loaded: LoadedVersion | None) -> str:
    return loaded.version or "none" if loaded is not None else "nothing"
