"""Frozen-backbone feature cache: every scene crop and product image goes through the backbone once.

The backbone never trains, so its pooled features depend only on (backbone, weights, preprocessing). They
live in `cache_root/<backbone>-<weights_sha[:12]>-<preprocess_sha[:12]>/`:

- `manifest.json`: what produced the features (checked on every open) and row counts;
- `<kind>-<seq>.npy` + `<kind>-<seq>.keys`: a float32 [rows, dim] memmap and one key per line. A segment
  is written chunk by chunk: rows are flushed to the .npy first, then their keys are appended to the
  .keys file, so a key is only ever listed once its row is on disk. A run killed half-way keeps every
  finished chunk and the next run computes only what is missing (it appends a new segment);
- `failed.jsonl`: images that cannot be decoded or cropped, so later runs do not retry them forever.

`kind` is `scene` (key: scene id + bbox, see `scene_key`) or `product` (key: product id).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.data.stl import KINDS, Kind, Pair, STLDataset
from training.errors import DataError, TrainingError
from training.exec.executor import EmbedJob, Executor, ImageItem, LocalExecutor
from training.io import write_text_atomic
from training.model.backbones import load_backbone
from training.model.embedder import Embedder
from training.model.preprocess import Preprocess
from training.model.runtimes import RuntimeName

LOG = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
FAILED_FILE = "failed.jsonl"
LOCK_FILE = ".lock"
DTYPE = np.float32
# Every incremental run adds a segment; past this many per kind they are merged so opens stay cheap.
MAX_SEGMENTS = 16
_SEGMENT_RE = re.compile(r"^(scene|product)-(\d{6})\.npy$")
# Decode/crop problems that belong to the image itself are recorded and never retried; a missing or
# unreachable file may be fixed, so it is reported but retried (`training.exec.executor.decode_item`).


class FeatureCacheError(TrainingError, RuntimeError):
    """The cache directory belongs to another backbone/preprocessing, or its files are unreadable."""


class MissingFeatures(TrainingError, KeyError):
    """Features were asked for an image that is not in the cache (never extracted, or it failed)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def scene_key(pair: Pair) -> str:
    """Cache key of a scene crop: scene id + bbox rounded to 6 decimals (pairs sharing a crop share it)."""
    return f"{pair.scene_id}@" + ",".join(f"{value:.6f}" for value in pair.bbox)


def cache_dir(cache_root: str | Path, embedder: Embedder) -> Path:
    backbone = embedder.backbone
    return Path(cache_root) / (
        f"{backbone.name}-{backbone.weights_sha256[:12]}-{embedder.preprocess.sha256()[:12]}"
    )


def _fingerprint(embedder: Embedder) -> dict:
    """What the cached features depend on: not the head, not the device."""
    return {
        "format": CACHE_FORMAT,
        "backbone": embedder.backbone.name,
        "backbone_weights_sha256": embedder.backbone.weights_sha256,
        "preprocess": embedder.preprocess.to_dict(),
        "dim": embedder.backbone.dim,
        "dtype": np.dtype(DTYPE).name,
    }


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """flock the cache directory: one writer at a time, readers never see a merge half-done."""
    with (directory / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_keys(path: Path) -> list[str]:
    """Committed keys of a segment; a line torn by a kill (no trailing newline) is not committed."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = text.split("\n")
    return lines[:-1]  # the last element is "" after a complete line, or a torn line


def _segments(directory: Path, kind: Kind) -> list[Path]:
    return sorted(p for p in directory.glob(f"{kind}-*.npy") if _SEGMENT_RE.match(p.name))


def _next_seq(directory: Path) -> int:
    numbers = [int(m[2]) for p in directory.glob("*.npy") if (m := _SEGMENT_RE.match(p.name))]
    return max(numbers, default=0) + 1


class _Table:
    """One kind's features across its segments: key -> row, gathered into plain arrays on request."""

    def __init__(self, directory: Path, kind: Kind, dim: int) -> None:
        self.kind = kind
        self.arrays: list[np.ndarray] = []
        self.index: dict[str, tuple[int, int]] = {}
        for path in _segments(directory, kind):
            keys = _read_keys(path.with_suffix(".keys"))
            if not keys:
                continue
            try:
                array = np.load(path, mmap_mode="r")  # mmap: the cache may be larger than RAM
            except (OSError, ValueError) as exc:
                raise FeatureCacheError(f"feature segment {path} is unreadable ({exc}); delete {directory}") from exc
            if array.ndim != 2 or array.shape[1] != dim or array.shape[0] < len(keys):
                raise FeatureCacheError(
                    f"feature segment {path} has shape {array.shape} for {len(keys)} keys of dim {dim}; "
                    f"delete {directory} and extract again"
                )
            number = len(self.arrays)
            self.arrays.append(array)
            # Later segments win: after a merge interrupted before cleanup a key is in two, with equal rows.
            self.index.update((key, (number, row)) for row, key in enumerate(keys))

    def __len__(self) -> int:
        return len(self.index)

    def gather(self, keys: Sequence[str], dim: int, failed: dict[str, str], directory: Path) -> np.ndarray:
        out = np.empty((len(keys), dim), dtype=DTYPE)
        if not keys:
            return out
        located = np.empty((len(keys), 2), dtype=np.int64)
        for position, key in enumerate(keys):
            where = self.index.get(key)
            if where is None:
                reason = f" (extraction failed: {failed[key]})" if key in failed else ""
                raise MissingFeatures(f"no cached {self.kind} features for {key!r} in {directory}{reason}")
            located[position] = where
        for number, array in enumerate(self.arrays):
            positions = np.flatnonzero(located[:, 0] == number)
            if len(positions):
                out[positions] = array[located[positions, 1]]
        return out


class CachedFeatures:
    """Read access to a feature cache directory (memory-mapped; arrays are copied out on request)."""

    def __init__(self, directory: Path, computed: int = 0) -> None:
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        try:
            self.manifest: dict = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FeatureCacheError(f"{self.directory} is not a feature cache (no {MANIFEST_FILE})") from None
        except json.JSONDecodeError as exc:
            raise FeatureCacheError(f"{manifest_path} is corrupt: {exc}") from exc
        self.dim = int(self.manifest["dim"])
        self.computed = computed  # images this call ran through the backbone (0 on a full cache hit)
        with _locked(self.directory, exclusive=False):
            self._tables = {kind: _Table(self.directory, kind, self.dim) for kind in KINDS}
            self.failed_scenes, self.failed_products = _read_failed(self.directory)

    @classmethod
    def open(cls, directory: str | Path) -> CachedFeatures:
        return cls(Path(directory))

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.manifest["preprocess"])

    @property
    def n_scenes(self) -> int:
        return len(self._tables["scene"])

    @property
    def n_products(self) -> int:
        return len(self._tables["product"])

    def has_scene(self, pair: Pair) -> bool:
        return scene_key(pair) in self._tables["scene"].index

    def has_product(self, product_id: str) -> bool:
        return product_id in self._tables["product"].index

    def scene_features(self, pairs: Sequence[Pair]) -> np.ndarray:
        """[n, backbone_dim] float32 backbone features of the pairs' scene crops, in order."""
        keys = [scene_key(pair) for pair in pairs]
        return self._tables["scene"].gather(keys, self.dim, self.failed_scenes, self.directory)

    def product_features(self, product_ids: Sequence[str]) -> np.ndarray:
        """[m, backbone_dim] float32 backbone features of the product images, in order."""
        return self._tables["product"].gather(list(product_ids), self.dim, self.failed_products, self.directory)


def _read_failed(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    failed: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
    path = directory / FAILED_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                record = json.loads(line)
                failed[record["kind"]][record["key"]] = record["reason"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # empty or torn last line
    return failed["scene"], failed["product"]


@dataclass(frozen=True)
class _Item:
    kind: Kind
    key: str
    image: ImageItem


class _SegmentWriter:
    """Appends rows of one kind to a fresh segment, committing keys only after their rows are flushed."""

    def __init__(self, directory: Path, kind: Kind, seq: int, capacity: int, dim: int) -> None:
        self.path = directory / f"{kind}-{seq:06d}.npy"
        self.keys_path = self.path.with_suffix(".keys")
        self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=DTYPE, shape=(capacity, dim))
        self.rows = 0

    def append(self, keys: Sequence[str], features: np.ndarray) -> None:
        if not keys:
            return
        self.array[self.rows : self.rows + len(keys)] = features
        self.array.flush()
        with self.keys_path.open("a", encoding="utf-8") as out:
            out.write("".join(f"{key}\n" for key in keys))
            out.flush()
            os.fsync(out.fileno())
        self.rows += len(keys)

    def close(self) -> None:
        del self.array


def _check_manifest(directory: Path, fingerprint: dict) -> None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        write_text_atomic(path, json.dumps({**fingerprint, "counts": {}}, indent=2, sort_keys=True))
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatureCacheError(f"{path} is corrupt ({exc}); delete {directory} and extract again") from exc
    if not isinstance(manifest, dict):  # valid JSON, but not the object this cache writes
        raise FeatureCacheError(f"{path} is corrupt (expected a JSON object, got {type(manifest).__name__}); "
                                f"delete {directory} and extract again")
    differing = [name for name in fingerprint if manifest.get(name) != fingerprint[name]]
    if differing:
        raise FeatureCacheError(
            f"feature cache {directory} was written by another backbone or preprocessing "
            f"(fields {differing} differ); delete it or use another --cache directory"
        )


def _update_counts(directory: Path, fingerprint: dict, counts: dict[str, int]) -> None:
    manifest = json.dumps({**fingerprint, "counts": counts}, indent=2, sort_keys=True)
    write_text_atomic(directory / MANIFEST_FILE, manifest)


def _cleanup_orphans(directory: Path) -> None:
    """Remove segments a killed run created before committing any row (holding the writer lock)."""
    for kind in KINDS:
        for path in _segments(directory, kind):
            if not _read_keys(path.with_suffix(".keys")):
                LOG.info("removing empty segment %s left by an interrupted run", path.name)
                path.unlink()
                path.with_suffix(".keys").unlink(missing_ok=True)


def _merge_segments(directory: Path, kind: Kind, dim: int) -> None:
    """Merge a kind's segments into one (holding the writer lock); readers see old or new, never half."""
    segments = _segments(directory, kind)
    if len(segments) <= MAX_SEGMENTS:
        return
    table = _Table(directory, kind, dim)
    keys = list(table.index)
    LOG.info("merging %d %s segments (%d rows)", len(segments), kind, len(keys))
    seq = _next_seq(directory)
    merged = directory / f"{kind}-{seq:06d}.npy"
    array = np.lib.format.open_memmap(merged, mode="w+", dtype=DTYPE, shape=(len(keys), dim))
    for start in range(0, len(keys), 65536):
        array[start : start + 65536] = table.gather(keys[start : start + 65536], dim, {}, directory)
    array.flush()
    del array, table
    write_text_atomic(merged.with_suffix(".keys"), "".join(f"{key}\n" for key in keys))
    for path in segments:
        path.with_suffix(".keys").unlink(missing_ok=True)  # keys first: a segment without keys is an orphan
        path.unlink(missing_ok=True)


def _record_failures(directory: Path, failures: list[tuple[_Item, str]]) -> None:
    if not failures:
        return
    with (directory / FAILED_FILE).open("a", encoding="utf-8") as out:
        for item, reason in failures:
            out.write(json.dumps({"kind": item.kind, "key": item.key, "reason": reason}) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _wanted(dataset: STLDataset, pairs: Sequence[Pair], products: Sequence[str]) -> list[_Item]:
    """Unique images to have features for: scene crops first, then products, in first-seen order."""
    items: dict[tuple[str, str], _Item] = {}
    for pair in pairs:
        key = scene_key(pair)
        items.setdefault(("scene", key), _Item("scene", key, ImageItem(dataset.scene_location(pair.scene_id),
                                                                        pair.bbox)))
    for product_id in products:
        items.setdefault(("product", product_id),
                         _Item("product", product_id, ImageItem(dataset.product_location(product_id))))
    return list(items.values())


def cache_features(
    dataset: STLDataset,
    embedder: Embedder,
    cache_root: Path,
    pairs: Sequence[Pair] | None = None,
    products: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    runtime: RuntimeName = "auto",
    export_dir: Path | None = None,
    executor: Executor | None = None,
    load: Callable[[str], Embedder] | None = None,
) -> CachedFeatures:
    """Extract the backbone features of every scene crop and product image not yet cached; open the cache.

    `pairs` defaults to `dataset.pairs`, `products` to `dataset.catalogue()`. Images that fail to decode
    or crop are logged, recorded in `failed.jsonl` and skipped (`CachedFeatures.has_scene` says which).
    The backbone runs in `runtime` (`training.model.batch_runtime`: OpenVINO on a CPU with `auto`, over
    `export_dir` when it holds the embedder's export); its features equal torch's within 1e-5, so the cache
    key does not name the runtime.

    `executor` runs the extraction (default: `LocalExecutor(workers)`, this process); a remote one (Ray) needs
    `load`, a picklable device -> Embedder that rebuilds `embedder` on a worker (e.g. `backbone_loader(...)`).
    Either way this process writes the segments, chunk by chunk as results arrive.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}")
    pairs = dataset.pairs if pairs is None else pairs
    products = dataset.catalogue() if products is None else products
    directory = cache_dir(cache_root, embedder)
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(embedder)
    computed = 0
    with _locked(directory, exclusive=True):
        _check_manifest(directory, fingerprint)
        _cleanup_orphans(directory)
        for kind in KINDS:
            _merge_segments(directory, kind, embedder.backbone.dim)
        existing = {kind: set(_Table(directory, kind, embedder.backbone.dim).index) for kind in KINDS}
        failed_scenes, failed_products = _read_failed(directory)
        known_failed = {"scene": failed_scenes, "product": failed_products}
        missing = [
            item for item in _wanted(dataset, pairs, products)
            if item.key not in existing[item.kind] and item.key not in known_failed[item.kind]
        ]
        LOG.info("feature cache %s: %d scene crops and %d products cached, %d to extract",
                 directory, len(existing["scene"]), len(existing["product"]), len(missing))
        if missing:
            job = EmbedJob("features", load, runtime, batch_size, export_dir, loaded=embedder)
            computed = _extract(directory, executor or LocalExecutor(workers), job, embedder.backbone.dim, missing,
                                progress)
            counts = {kind: len(_Table(directory, kind, embedder.backbone.dim)) for kind in KINDS}
            _update_counts(directory, fingerprint, counts)
    return CachedFeatures(directory, computed=computed)


def _extract(directory: Path, executor: Executor, job: EmbedJob, backbone_dim: int, missing: list[_Item],
             progress: bool) -> int:
    seq = _next_seq(directory)
    writers: dict[str, _SegmentWriter] = {}
    for offset, kind in enumerate(KINDS):
        capacity = sum(item.kind == kind for item in missing)
        if capacity:
            writers[kind] = _SegmentWriter(directory, kind, seq + offset, capacity, backbone_dim)
    computed, failures_seen = 0, 0
    try:
        with tqdm(total=len(missing), unit="img", desc="features", disable=not progress) as bar:
            for chunk in executor.map_embed(job, [item.image for item in missing]):
                failures = [(missing[position], error, transient) for position, error, transient in chunk.errors]
                for item, error, _ in failures:
                    LOG.warning("skipping %s %s (%s): %s", item.kind, item.key, item.image.location, error)
                _record_failures(directory, [(item, error) for item, error, transient in failures if not transient])
                failures_seen += len(failures)
                if len(chunk.positions):
                    for kind, writer in writers.items():
                        rows = [i for i, position in enumerate(chunk.positions) if missing[position].kind == kind]
                        writer.append([missing[chunk.positions[i]].key for i in rows], chunk.values[rows])
                    computed += len(chunk.positions)
                bar.update(len(chunk.positions) + len(chunk.errors))
    finally:
        for writer in writers.values():
            writer.close()
    if failures_seen:
        LOG.warning("%d of %d images could not be read or cropped; see %s", failures_seen, len(missing),
                    directory / FAILED_FILE)
    return computed


def _backbone_embedder(backbone: str, backbone_weights: str | Path | None, context: float, jpeg_draft: bool,
                       device: str) -> Embedder:
    return Embedder(load_backbone(backbone, backbone_weights), context=context, device=device, jpeg_draft=jpeg_draft)


def backbone_loader(backbone: str, backbone_weights: str | Path | None = None, context: float = 0.1,
                    jpeg_draft: bool = False) -> Callable[[str], Embedder]:
    """A picklable device -> Embedder (no head) for remote workers: the weights file must be visible there."""
    return partial(_backbone_embedder, backbone, backbone_weights, context, jpeg_draft)


def extract_features(
    data: str | Path,
    cache_root: str | Path,
    backbone: str,
    backbone_weights: str | Path | None = None,
    context: float = 0.1,
    jpeg_draft: bool = False,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    runtime: RuntimeName = "auto",
    executor: Executor | None = None,
    images: str | None = None,
) -> CachedFeatures:
    """Cache the backbone features of a whole dataset (records that do not load are skipped); open the cache.

    `images`: where the image files are when not under `data/images` (a URI, see `STLDataset.open`)."""
    if context < 0:
        raise DataError(f"--context must be >= 0, got {context}")
    try:
        dataset = STLDataset.open(data, on_error="skip", images=images)
    except FileNotFoundError as exc:  # STLDataset.open's other failures are DataErrors already
        raise DataError(f"cannot open dataset {data}: {exc}") from exc
    embedder = Embedder(load_backbone(backbone, backbone_weights), context=context, device=device,
                        jpeg_draft=jpeg_draft)
    return cache_features(dataset, embedder, Path(cache_root), batch_size=batch_size, workers=workers,
                          progress=progress, runtime=runtime, executor=executor,
                          load=backbone_loader(backbone, backbone_weights, context, jpeg_draft))
