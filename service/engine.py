"""One loaded index version (embedder + per-category indexes + popularity) and the holder that swaps it.

An `Engine` is built completely off to the side and never mutated afterwards; a hot reload replaces
the holder's single reference. A request reads that reference once and uses the same engine until
it answers, so it can never see half of one version and half of another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch

from index.artifact import ArtifactError, CategoryIndex, current_version, open_artifact
from service.settings import Settings
from training.data.stl import CategoryResolver
from training.model.checkpoint import load_embedder
from training.model.embedder import Embedder

LOG = logging.getLogger(__name__)


class PopularityTable(Protocol):
    def top(self, category: str, k: int) -> list[tuple[str, float]]: ...

    def categories(self) -> list[str]: ...


@dataclass(frozen=True)
class Engine:
    version: str | None
    product_counts: Mapping[str, int]  # full path -> products in the catalogue
    resolver: CategoryResolver
    popularity: PopularityTable | None
    embedder: Embedder | None
    indexes: Mapping[str, CategoryIndex] = field(default_factory=dict)
    problem: str | None = None  # why embeddings cannot be served (the service is then degraded)
    loaded_at: float = field(default_factory=time.time)

    @property
    def model_loaded(self) -> bool:
        return self.embedder is not None and bool(self.indexes)

    @property
    def status(self) -> Literal["ready", "degraded"]:
        return "ready" if self.model_loaded and self.problem is None else "degraded"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_engine(settings: Settings, version: str | None = None) -> Engine:
    """Load a version (None: the pinned one, else `current`) fully before anyone can see it.

    Raises ArtifactError only when no artifact can be opened at all. A model or index that is
    missing, corrupt or mismatched yields a degraded engine that still serves popularity.
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
    embedder: Embedder | None = None
    indexes: dict[str, CategoryIndex] = {}
    try:
        checkpoint = settings.checkpoint or artifact.checkpoint_path
        embedder = load_embedder(checkpoint, settings.device, settings.backbone_weights)
        artifact.check_embedder(embedder.fingerprint())
        indexes = artifact.load_indexes()
        # One forward pass now: a broken model fails here, at load time, not on the first user.
        size = embedder.preprocess.image_size
        embedder.embed_batch(torch.zeros(1, 3, size, size), "scene")
    except Exception as exc:  # missing, corrupt or mismatched: degrade to popularity, keep serving
        LOG.error("version %s cannot serve embeddings, falling back to popularity: %s", artifact.version,
                  _describe(exc))
        problems.insert(0, f"embeddings unavailable ({_describe(exc)})")
        embedder, indexes = None, {}
    paths = set(artifact.categories) | set(indexes)
    if popularity is not None:
        paths |= set(popularity.categories())
    engine = Engine(
        version=artifact.version,
        product_counts=dict(artifact.categories),
        resolver=CategoryResolver(paths),
        popularity=popularity,
        embedder=embedder,
        indexes=indexes,
        problem="; ".join(problems) or None,
    )
    LOG.info("loaded index version %s (%s, %d categories, %d indexed) in %.2fs", engine.version, engine.status,
             len(paths), len(indexes), time.perf_counter() - started)
    return engine


class EngineHolder:
    """The engine being served; `engine` is read once per request, `swap` replaces it in one assignment."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = Path(artifacts)
        self._engine: Engine | None = None
        self.loading = True
        self.load_error: str | None = None
        # One reload at a time: two concurrent ones would load the same version twice for nothing.
        self.reload_lock = threading.Lock()

    @property
    def engine(self) -> Engine | None:
        return self._engine

    def swap(self, engine: Engine) -> Engine | None:
        previous, self._engine = self._engine, engine
        self.load_error = None
        return previous

    def published_version(self) -> str | None:
        return current_version(self.artifacts)


def initial_load(holder: EngineHolder, settings: Settings) -> None:
    """Start-up load; with no artifact at all the service still starts and says why it is unavailable."""
    try:
        holder.swap(load_engine(settings))
    except ArtifactError as exc:
        holder.load_error = str(exc)
        LOG.error("no index artifact can be served: %s", exc)
    finally:
        holder.loading = False
