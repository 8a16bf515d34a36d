"""Writing one artifact version into a staging directory: per-category files first, manifest last."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from index.ann import (
    DEFAULT_APPROXIMATE,
    DEFAULT_EXACT_THRESHOLD,
    Approximate,
    IndexSpec,
    build_index,
    choose_spec,
    tune_search_params,
)
from index.artifact import CHECKPOINT_FILE, POPULARITY_FILE, PRODUCTS_FILE
from index.catalogue import CATALOGUE_FILE, CatalogueRow, write_catalogue
from index.errors import CorruptArtifact
from index.manifest import (
    JSON_INDENT,
    MANIFEST_FILE,
    CategoryEntry,
    DetectorRecord,
    EmbedderFingerprint,
    ExportRecord,
    Manifest,
    Provenance,
    write_manifest,
)
from training.data.popularity import Popularity
from training.io import file_sha256, write_bytes_atomic, write_json_atomic
from training.model.detect_post import CHECKPOINT_FILE as DETECTOR_CHECKPOINT_FILE
from training.model.detect_post import EXPORT_MANIFEST_FILE as DETECTOR_MANIFEST_FILE
from training.model.detect_post import DetectorExport
from training.model.runtimes.base import MANIFEST_FILE as EXPORT_MANIFEST_FILE
from training.model.runtimes.base import ExportManifest

LOG = logging.getLogger(__name__)

EXPORT_DIR = "export"  # the version's subfolder holding its exported model (`Manifest.export`)
DETECTOR_DIR = "detector"  # the version's subfolder holding its item detector (`Manifest.detector`)


@dataclass
class CategoryData:
    """One category's rows. `index`/`spec` are given when an incremental change already updated the index."""

    category: str
    ids: list[str]
    vectors: np.ndarray
    index: faiss.Index | None = None
    spec: IndexSpec | None = None
    tuned_recall: float | None = None
    # (version dir, manifest entry) of an unchanged category: its files are linked, not rebuilt.
    copy_from: tuple[Path, CategoryEntry] | None = None


def category_slug(category: str) -> str:
    """A file-name-safe, collision-free name for a category path ("A|B C" -> "a-b-c-1f3a9d")."""
    readable = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")[:60] or "category"
    return f"{readable}-{hashlib.sha256(category.encode()).hexdigest()[:6]}"


def new_version(salt: str) -> str:
    """UTC timestamp (microseconds, so names sort by creation) + a short hash of what was built."""
    now = datetime.now(UTC)
    digest = hashlib.sha256(f"{salt}|{now.isoformat()}|{os.getpid()}".encode()).hexdigest()[:8]
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{digest}"


# Every file goes through training.io's atomic writers, which fsync: a published version must survive a
# power cut, so its data reaches the disk before the rename that publishes it.


def write_index(path: Path, index: faiss.Index) -> None:
    write_bytes_atomic(path, memoryview(faiss.serialize_index(index)))


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    write_bytes_atomic(path, buffer.getbuffer())


def write_category(staging: Path, data: CategoryData, exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
                   approximate: Approximate = DEFAULT_APPROXIMATE, seed: int = 0,
                   progress: bool = False) -> CategoryEntry:
    """Build (unless given) and write one category's index, ids and vectors; return its manifest entry."""
    if data.copy_from is not None:
        return _link_category(staging, *data.copy_from)
    vectors = np.ascontiguousarray(data.vectors, dtype=np.float32)
    if len(vectors) != len(data.ids) or len(vectors) == 0:
        raise ValueError(f"category {data.category!r}: {len(vectors)} vectors for {len(data.ids)} ids")
    if len(set(data.ids)) != len(data.ids):
        raise ValueError(f"category {data.category!r}: duplicate product ids")
    spec, index, recall = data.spec, data.index, data.tuned_recall
    if index is None:
        spec = spec or choose_spec(len(vectors), exact_threshold, approximate)
        started = time.perf_counter()
        index = build_index(vectors, spec, seed=seed, progress=progress)
        params, recall = tune_search_params(index, vectors, spec, seed=seed)
        spec = IndexSpec(spec.factory, spec.kind, params)
        LOG.info("%s: %s over %d vectors in %.1f s", data.category, spec.factory, len(vectors),
                 time.perf_counter() - started)
    assert spec is not None
    entry = CategoryEntry.named(category_slug(data.category), len(vectors), spec, recall)
    write_index(staging / entry.index_file, index)
    write_json_atomic(staging / entry.ids_file, list(data.ids), indent=JSON_INDENT)
    write_vectors(staging / entry.vectors_file, vectors)
    return entry


def _link(source: Path, target: Path) -> None:
    # Versions are immutable once published, so a hard link is a safe, instant copy; pruning the old
    # version later only drops its name for the file.
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, target)


def _link_category(staging: Path, source: Path, entry: CategoryEntry) -> CategoryEntry:
    for name in entry.files:
        _link(source / name, staging / name)
    return entry


def _stage_files(source: Path, target: Path, names: list[str], expected: dict[str, str] | None,
                 what: str) -> dict[str, str]:
    """Link `names` from `source` into the new folder `target`; their sha256s, which must equal `expected`
    (a parent version's record) when given."""
    target.mkdir()
    for name in names:
        _link(source / name, target / name)
    files = {name: file_sha256(target / name) for name in sorted(names)}
    if expected is not None and files != expected:
        raise CorruptArtifact(f"{what} in {source} differs from the sha256s its manifest recorded")
    return files


def stage_export(staging: Path, source: Path, checked: dict[str, float], min_cosine: float,
                 expected: dict[str, str] | None = None) -> ExportRecord:
    """Link an export folder (`training.model.export.export_embedder`'s output) into `staging/EXPORT_DIR`
    and record its files' sha256s; with `expected` (a parent version's record) every file must match it."""
    names = ExportManifest.read(source).files() + [EXPORT_MANIFEST_FILE]
    files = _stage_files(source, staging / EXPORT_DIR, names, expected, "the exported model")
    return ExportRecord(EXPORT_DIR, files, dict(checked), min_cosine)


def stage_detector(staging: Path, source: Path, max_abs_diff: float | None = None, origin: str | None = None,
                   expected: dict[str, str] | None = None) -> DetectorRecord:
    """Link a detector folder (`index.detector.prepare_detector`'s output: checkpoint, graph, detector.json)
    into `staging/DETECTOR_DIR` and record its files' sha256s; with `expected` every file must match it."""
    export = DetectorExport.read(source)
    export.verify(source)
    names = [DETECTOR_CHECKPOINT_FILE, export.graph_file, DETECTOR_MANIFEST_FILE]
    files = _stage_files(source, staging / DETECTOR_DIR, names, expected, "the detector")
    if files[DETECTOR_CHECKPOINT_FILE] != export.checkpoint_sha256:
        raise CorruptArtifact(f"{source}: {DETECTOR_MANIFEST_FILE} was exported from another checkpoint")
    return DetectorRecord(DETECTOR_DIR, files, list(export.categories), export.image_size,
                          export.max_abs_diff if max_abs_diff is None else max_abs_diff, origin)


def write_version(
    staging: Path,
    version: str,
    categories: Sequence[CategoryData],
    fingerprint: dict,
    checkpoint: Path,
    popularity: Popularity,
    products: list[dict],
    provenance: Provenance,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    approximate: Approximate = DEFAULT_APPROXIMATE,
    seed: int = 0,
    progress: bool = False,
    started: float | None = None,
    catalogue: Iterable[CatalogueRow] | None = None,
    examples: Callable[[Path], object] | None = None,
    export: Callable[[Path], ExportRecord] | None = None,
    detector: Callable[[Path], DetectorRecord] | None = None,
) -> Manifest:
    """Fill `staging` with a complete version; the manifest, written last, records every file's sha256.

    `examples` writes the version's sample scenes into the staging folder (`index.examples`); `export`
    puts an exported model into it (`stage_export`) and returns its record; None: the version has none.
    `detector` does the same for the item detector (`stage_detector`).

    `fingerprint` is `Embedder.fingerprint()` of the embedder the vectors came from; `started` (a
    time.perf_counter() value) is when the whole operation began, for `build_seconds`.
    """
    index_started = time.perf_counter()
    started = index_started if started is None else started
    staging.mkdir(parents=True, exist_ok=False)
    write_bytes_atomic(staging / CHECKPOINT_FILE, Path(checkpoint).read_bytes())  # a head: a few MB
    entries: dict[str, CategoryEntry] = {}
    for data in tqdm(sorted(categories, key=lambda c: c.category), desc="index categories", unit="cat",
                     disable=not progress):
        entries[data.category] = write_category(staging, data, exact_threshold, approximate, seed, progress)
    write_json_atomic(staging / PRODUCTS_FILE, products, indent=JSON_INDENT)
    popularity.to_json(staging / POPULARITY_FILE)
    if catalogue is not None:
        write_catalogue(staging / CATALOGUE_FILE, catalogue)
    if examples is not None:
        examples(staging)
    export_record = export(staging) if export is not None else None
    detector_record = detector(staging) if detector is not None else None
    files = {entry.name: file_sha256(entry) for entry in sorted(staging.iterdir()) if entry.is_file()}
    manifest = Manifest(
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        embedder=EmbedderFingerprint.from_dict(fingerprint),
        checkpoint_file=CHECKPOINT_FILE,
        exact_threshold=exact_threshold,
        approximate=approximate,
        product_count=sum(entry.count for entry in entries.values()),
        categories=entries,
        provenance=provenance,
        index_seconds=round(time.perf_counter() - index_started, 3),
        build_seconds=round(time.perf_counter() - started, 3),
        files=files,
        export=export_record,
        detector=detector_record,
    )
    write_manifest(staging / MANIFEST_FILE, manifest)
    return manifest
