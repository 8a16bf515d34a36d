"""The executor interface of the batch jobs, and the local one: today's DataLoader loop in this process.

An executor does two things: `map_embed(job, items)` runs the one embedder over image locations and yields
chunks of results as they finish (so the feature cache can commit them and resume after a kill), and
`map_tasks(fn, args)` runs independent calls (the per-category FAISS builds). The driver keeps everything
that writes: cache segments, the artifact, its publication.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from training.data.stl import BBox, is_uri, read_bytes
from training.model.batch_runtime import batch_runtime
from training.model.embedder import Embedder
from training.model.preprocess import Preprocess, load_crop
from training.model.runtimes import Runtime, RuntimeName

Output = Literal["features", "product"]  # backbone features of any image, or product index vectors
EngineName = Literal["local", "ray"]
ENGINES: tuple[str, ...] = ("local", "ray")
T = TypeVar("T")

# Decode/crop problems that belong to the image itself: callers may record them and never retry. A missing or
# unreachable file (FileNotFoundError, PermissionError, a network error while fetching) may be fixed: transient.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
TRANSIENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError)


@dataclass(frozen=True)
class ImageItem:
    location: str  # a local path or a URI (`training.data.stl.read_bytes`)
    bbox: BBox | None = None  # a scene crop; None: the whole image


@dataclass
class EmbedChunk:
    """Results of some items: `values[i]` belongs to `items[positions[i]]`; `errors` are (position, message,
    transient) of the items that could not be read or cropped."""

    positions: np.ndarray
    values: np.ndarray
    errors: list[tuple[int, str, bool]] = field(default_factory=list)


@dataclass(frozen=True)
class EmbedJob:
    """What to compute per image and how a worker gets the model.

    `load(device)` builds the embedder once per worker; it must pickle (a module-level function or a
    `functools.partial` of one) and read files the workers can see. `loaded`/`opened` are the driver's own
    embedder and open runtime, used by the local executor so nothing loads twice; they never travel.
    """

    output: Output
    load: Callable[[str], Embedder] | None = None
    runtime: RuntimeName = "auto"
    batch_size: int = 64
    export_dir: Path | None = None  # an export of the embedder the driver made (local reuse only)
    loaded: Embedder | None = field(default=None, compare=False, repr=False)
    opened: Runtime | None = field(default=None, compare=False, repr=False)

    def shippable(self) -> EmbedJob:
        """The job as a remote worker gets it: the loader only (each worker exports its own model)."""
        if self.load is None:
            raise ValueError("a job for remote workers needs `load`, a picklable device -> Embedder function")
        return replace(self, export_dir=None, loaded=None, opened=None)


def decode_item(item: ImageItem, preprocess: Preprocess) -> tuple[np.ndarray | None, str | None, bool]:
    """(array [3, S, S], None, False), or (None, message, transient) when the image cannot be had."""
    try:
        source: str | bytes = read_bytes(item.location) if is_uri(item.location) else item.location
    except TRANSIENT_ERRORS + (OSError,) as exc:  # network and store errors: worth another try later
        return None, f"{type(exc).__name__}: {exc}", True
    try:
        return load_crop(source, item.bbox, preprocess).numpy(), None, False
    except TRANSIENT_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}", True
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}", False


def compute(runtime: Runtime, batch: np.ndarray, output: Output) -> np.ndarray:
    return runtime.backbone_features(batch) if output == "features" else runtime.vectors(batch, "product")


class Executor(Protocol):
    name: str

    def map_embed(self, job: EmbedJob, items: Sequence[ImageItem]) -> Iterator[EmbedChunk]:
        """Run the job over every item; chunks come in any order, each item in exactly one chunk."""
        ...

    def map_tasks(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
        """[fn(*a) for a in args], in order."""
        ...


class _Images(Dataset):
    """Decode + crop + resize + normalise in DataLoader workers, with the embedder's own preprocessing."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocess) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, np.ndarray | None, str | None, bool]:
        return position, *decode_item(self.items[position], self.preprocess)


def _collate(samples: list[tuple[int, np.ndarray | None, str | None, bool]]) -> dict:
    good = [(position, array) for position, array, _, _ in samples if array is not None]
    return {
        "positions": np.asarray([position for position, _ in good], dtype=np.int64),
        # A tensor, not an array: DataLoader hands tensors over in shared memory, arrays through a pipe.
        "batch": torch.from_numpy(np.stack([array for _, array in good])) if good else None,
        "errors": [(position, error, transient) for position, _, error, transient in samples if error is not None],
    }


class LocalExecutor:
    """This process runs the model; `workers` DataLoader processes decode the next batches meanwhile."""

    name = "local"

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def map_embed(self, job: EmbedJob, items: Sequence[ImageItem]) -> Iterator[EmbedChunk]:
        embedder = job.loaded if job.loaded is not None else job.load("auto") if job.load is not None else None
        if embedder is None:
            raise ValueError("an EmbedJob needs `loaded` or `load`")
        opened = (contextlib.nullcontext(job.opened) if job.opened is not None
                  else batch_runtime(embedder, job.runtime, job.export_dir))
        loader = DataLoader(
            _Images(items, embedder.preprocess),
            batch_size=job.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_collate,
            # Workers decode the next batches while the network runs: the job keeps pace with the bare forward
            # pass instead of alternating decode and compute.
            prefetch_factor=4 if self.workers > 0 else None,
        )
        with opened as runtime:
            for chunk in loader:
                batch = chunk["batch"]
                values = (compute(runtime, batch.numpy(), job.output) if batch is not None
                          else np.zeros((0, 0), dtype=np.float32))
                yield EmbedChunk(chunk["positions"], values, chunk["errors"])

    def map_tasks(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
        return [fn(*call) for call in args]
