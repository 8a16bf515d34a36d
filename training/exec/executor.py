"""The executor interface of the batch jobs, and the local one: decode beside the model, in this process.

An executor does two things: `map_embed(job, items)` runs the one embedder over image locations and yields
chunks of results as they finish (so the feature cache can commit them and resume after a kill), and
`map_tasks(fn, args)` runs independent calls (the per-category FAISS builds). The driver keeps everything
that writes: cache segments, the artifact, its publication.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
from training.model.preprocess import Preprocess, load_array
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


def decode_item(item: ImageItem, preprocess: Preprocess,
                out: np.ndarray | None = None) -> Decoded:
    """(array [3, S, S], None, False), or (None, message, transient) when the image cannot be had; the
    array is written into `out` when given (a row of the batch it goes into)."""
    try:
        source: str | bytes = read_bytes(item.location) if is_uri(item.location) else item.location
    except TRANSIENT_ERRORS + (OSError,) as exc:  # network and store errors: worth another try later
        return None, f"{type(exc).__name__}: {exc}", True
    try:
        return load_array(source, item.bbox, preprocess, out), None, False
    except TRANSIENT_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}", True
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {exc}", False


Decoded = tuple[np.ndarray | None, str | None, bool]  # what `decode_item` answers for one image


def empty_batch(count: int, preprocess: Preprocess) -> np.ndarray:
    """[count, 3, S, S] float32 for `decode_item(..., out=batch[row])` to decode each image into its row: no
    stacking copy afterwards (19 MB a batch of 32) and no fresh arrays to page-fault in, a few % of a job's
    time on 2 cores."""
    size = preprocess.image_size
    return np.empty((count, 3, size, size), dtype=np.float32)


def decoded_rows(batch: np.ndarray, results: Sequence[Decoded]) -> tuple[list[int], np.ndarray | None]:
    """The rows of `batch` that decoded (`results[row]`, from decoding into them), and the batch of those
    rows: the batch itself when every row did, a copy of the good ones otherwise (rare), None when none did."""
    good = [row for row, (array, _, _) in enumerate(results) if array is not None]
    if not good:
        return good, None
    return good, batch if len(good) == len(results) else batch[good]


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
    stacked = np.stack([array for _, array in good]) if good else None
    return {
        "positions": np.asarray([position for position, _ in good], dtype=np.int64),
        # A tensor, not an array, out of a DataLoader: it hands tensors over in shared memory, arrays in a pipe.
        "batch": torch.from_numpy(stacked) if stacked is not None else None,
        "errors": [(position, error, transient) for position, _, error, transient in samples if error is not None],
    }


class LocalExecutor:
    """This process runs the model while the next batches are decoded beside it.

    With an exported runtime (OpenVINO, ONNX Runtime: CPU graphs that release the GIL) `workers` threads of
    this process decode: PIL and numpy release the GIL too, and an array handed over between threads costs
    nothing, while a DataLoader worker process pickles every batch through shared memory, which cost the
    OpenVINO job a third of its throughput on 2 cores (benchmarks/bench_features.py). torch keeps its
    DataLoader workers (the GPU path, and what it was measured with).
    """

    name = "local"

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers

    def map_embed(self, job: EmbedJob, items: Sequence[ImageItem]) -> Iterator[EmbedChunk]:
        embedder = job.loaded if job.loaded is not None else job.load("auto") if job.load is not None else None
        if embedder is None:
            raise ValueError("an EmbedJob needs `loaded` or `load`")
        opened = (contextlib.nullcontext(job.opened) if job.opened is not None
                  else batch_runtime(embedder, job.runtime, job.export_dir))
        with opened as runtime:
            chunks = (self._decoded_in_threads(items, embedder.preprocess, job.batch_size)
                      if runtime.name != "torch" and self.workers > 0
                      else self._decoded_in_workers(items, embedder.preprocess, job.batch_size))
            for positions, batch, errors in chunks:
                values = (compute(runtime, batch, job.output) if batch is not None
                          else np.zeros((0, 0), dtype=np.float32))
                yield EmbedChunk(positions, values, errors)

    def _decoded_in_workers(self, items: Sequence[ImageItem], preprocess: Preprocess,
                            batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, list]]:
        loader = DataLoader(
            _Images(items, preprocess),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_collate,
            # Workers decode the next batches while the network runs: the job keeps pace with the bare forward
            # pass instead of alternating decode and compute.
            prefetch_factor=4 if self.workers > 0 else None,
        )
        for chunk in loader:
            batch = chunk["batch"]
            yield chunk["positions"], batch.numpy() if batch is not None else None, chunk["errors"]

    def _decoded_in_threads(self, items: Sequence[ImageItem], preprocess: Preprocess,
                            batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, list]]:
        decode = functools.partial(decode_item, preprocess=preprocess)
        starts = iter(range(0, len(items), batch_size))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="stl-decode") as pool:
            def submit() -> tuple[int, np.ndarray, list[Future]] | None:
                start = next(starts, None)
                if start is None:
                    return None
                chunk = items[start:start + batch_size]
                batch = empty_batch(len(chunk), preprocess)
                return start, batch, [pool.submit(decode, item, out=batch[row]) for row, item in enumerate(chunk)]

            # Two batches in flight: one decoding while the runtime runs the one before it.
            pending = collections.deque(batch for batch in (submit(), submit()) if batch is not None)
            while pending:
                start, batch, futures = pending.popleft()
                following = submit()
                if following is not None:
                    pending.append(following)
                results = [future.result() for future in futures]
                good, decoded = decoded_rows(batch, results)
                errors = [(start + row, error, transient) for row, (array, error, transient) in enumerate(results)
                          if array is None]
                yield np.asarray([start + row for row in good], dtype=np.int64), decoded, errors

    def map_tasks(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]]) -> list[T]:
        return [fn(*call) for call in args]
