"""The recommendation use case: `await engine.recommend(image, category, bbox, k, strategy)`.

The engine owns one request's whole path: resolve the category, decide whether popularity must
answer, then decode/crop -> forward pass -> index search through the batcher (whose stages are the
loaded version's `encode_pre` / `encode_core` / `encode_post`), falling back to popularity when the
embedding path breaks. Routes only parse form fields and serialise the `Recommendation`.

Where the per-request CPU work runs is deployment policy, decided once in `Engine.start` from the
settings and the device: on a CPU the batcher's own thread decodes, crops, embeds and searches in one
go; on a GPU a pool decodes and searches while the GPU runs forward passes (service/batching.py).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import torch

from service import process
from service.batching import Batcher
from service.images import BadInput
from service.metrics import Metrics
from service.schemas import Source, Strategy
from service.settings import Settings
from service.versions import LoadedVersion, Reloaded, Scene, VersionHolder
from training.data.stl import BBox, UnknownCategory
from training.model.device import resolve_device

LOG = logging.getLogger(__name__)

class NotServing(RuntimeError):
    """No index version is loaded: still loading (`loading`, worth retrying soon), or none can be."""

    def __init__(self, message: str, loading: bool) -> None:
        super().__init__(message)
        self.loading = loading


class RankedItem(NamedTuple):
    product_id: str
    score: float
    rank: int  # 1-based


@dataclass(frozen=True)
class Recommendation:
    category: str  # the full category path the items belong to
    source: Source
    fallback_reason: str | None  # why popularity answered instead of embeddings
    items: list[RankedItem]
    index_version: str | None


def batch_workers(settings: Settings) -> int:
    """STL_BATCH_WORKERS, or by default one per intra-op thread on a CPU (see service/batching.py) and
    one on a GPU."""
    if settings.batch_workers > 0:
        return settings.batch_workers
    try:
        device = resolve_device(settings.device)
    except ValueError:  # cuda asked for and absent: the load reports it; popularity needs no workers
        return 1
    return 1 if device.type == "cuda" else torch.get_num_threads()


def preprocess_inline(settings: Settings) -> bool:
    """STL_PREPROCESS_INLINE, or by default yes on a CPU (the batcher's thread decodes, crops and searches)
    and no on a GPU (a pool does, overlapping the GPU's forward passes)."""
    if settings.preprocess_inline is not None:
        return settings.preprocess_inline
    try:
        return resolve_device(settings.device).type == "cpu"
    except ValueError:  # cuda asked for and absent: nothing will be embedded, so either is right
        return True


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
    def start(cls, settings: Settings, metrics: Metrics) -> Engine:
        """Threads and policy for this deployment; nothing is loaded yet (see `load`)."""
        process.set_torch_threads(settings.torch_threads)  # before the batcher reads torch's thread count
        cpu_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="stl-cpu")
        batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000.0,
                          on_batch=metrics.batch_size.observe, workers=batch_workers(settings),
                          pool=None if preprocess_inline(settings) else cpu_pool)
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

    async def recommend(self, image: bytes, category: str, bbox: BBox | None = None, k: int = 10,
                        strategy: Strategy = "auto") -> Recommendation:
        """Products of `category` that go with the item at `bbox` in the scene photo `image`.

        BadInput for the client's mistakes (unknown category, bad image or crop); every other failure of
        the embedding path is logged, counted and answered by popularity.
        """
        loaded = self.serving()  # read once: the whole request sees one version
        try:
            full_path = loaded.resolver.resolve(category)
        except UnknownCategory as exc:
            raise BadInput(400, str(exc)) from None
        scene = Scene(image, bbox, full_path, k)
        fallback = loaded.fallback(full_path, strategy)
        hits: list[tuple[str, float]] | None = None
        if fallback is not None:
            # Not embedding, but a bad image or crop is still refused; any other error here is a bug.
            await asyncio.get_running_loop().run_in_executor(self.cpu_pool, loaded.check_scene, scene)
        else:
            try:
                hits = await self.batcher.run(loaded, scene)
            except BadInput:
                raise
            except Exception as exc:  # the model or index broke on this request: log, count, answer by popularity
                LOG.exception("embedding search failed for category %s; serving popularity", full_path)
                fallback = ("embedding_failed", f"embedding failed: {type(exc).__name__}")
        if hits is None:
            assert fallback is not None
            self.metrics.fallbacks.labels(reason=fallback[0]).inc()
            hits = loaded.popular(full_path, k)
        return Recommendation(
            category=full_path,
            source="embedding" if fallback is None else "popularity",
            fallback_reason=None if fallback is None else fallback[1],
            items=[RankedItem(pid, score, rank) for rank, (pid, score) in enumerate(hits[:k], 1)],
            index_version=loaded.version,
        )

    async def reload(self, version: str | None = None, force: bool = False) -> Reloaded:
        """Switch to a published version (ReloadRefused keeps the served one), other requests served meanwhile."""
        # In a thread of its own, whose OpenMP team ends with it (see service/process.py).
        return await process.run_in_own_thread(lambda: self.holder.reload(version, force), "stl-reload")
