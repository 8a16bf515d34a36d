"""Deriving a new version from the current one (incremental add/remove/update) without re-embedding the catalogue.

A derived version carries the parent's catalogue.sqlite along: kept products keep their stored data and
thumbnail bytes, renumbered to their rows in the new indexes. A parent built before catalogues existed
gets one only when the edit brings product data (`add --products`, `update`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import faiss
import numpy as np

from index.ann import choose_spec
from index.artifact import Artifact, open_artifact
from index.catalogue import Catalogue, CatalogueError, CatalogueRow, make_thumbnail
from index.examples import carry_examples
from index.manifest import Change, DetectorRecord, ExportRecord
from index.publish import clean_stale, publish, staged
from index.writer import CategoryData, new_version, stage_detector, stage_export, write_version
from training.data.popularity import Popularity
from training.data.products import Product
from training.data.stl import CategoryMap

LOG = logging.getLogger(__name__)


def unchanged(artifact: Artifact, category: str) -> CategoryData:
    entry = artifact.entry(category)
    return CategoryData(category, [], np.zeros((0, artifact.manifest.embedder.dim), np.float32),
                        copy_from=(artifact.path, entry))


def changed(artifact: Artifact, category: str, ids: list[str], vectors: np.ndarray,
            index: faiss.Index | None) -> CategoryData:
    """A category's new rows; `index` (already updated in place) is kept when its type still fits the size."""
    entry = artifact.entry(category)
    old = entry.spec
    wanted = choose_spec(len(ids), artifact.manifest.exact_threshold, artifact.manifest.approximate)
    if index is not None and old.kind == wanted.kind == "approximate":
        return CategoryData(category, ids, vectors, index=index, spec=old, tuned_recall=entry.tuning_recall_at_50)
    # Exact indexes are rebuilt (a flat copy is cheap); crossing the threshold rebuilds with the right type.
    return CategoryData(category, ids, vectors)


def restricted_popularity(artifact: Artifact, product_categories: dict[str, str]) -> Popularity:
    """The parent's training-pair counts, ranked over the new catalogue (removed products never surface)."""
    parent = artifact.popularity
    return Popularity({pid: parent.count(pid) for pid in product_categories}, CategoryMap(product_categories))


def placement(artifact: Artifact, categories: Sequence[CategoryData]) -> dict[str, tuple[str, int]]:
    """Product id -> (category, row) in the new version: its catalogue rows must follow the new ids."""
    placed: dict[str, tuple[str, int]] = {}
    for data in categories:
        ids = artifact.read_ids(data.category) if data.copy_from is not None else data.ids
        placed.update((product_id, (data.category, row)) for row, product_id in enumerate(ids))
    return placed


def _image_of(artifact: Artifact, record: dict) -> Path | None:
    # products.json holds absolute paths for added products and dataset-relative ones for built products.
    image = Path(str(record.get("image", "")))
    if not image.is_absolute() and artifact.manifest.provenance.data_root is not None:
        image = Path(artifact.manifest.provenance.data_root) / image
    return image if image.is_file() else None


def parent_rows(artifact: Artifact) -> Iterator[CatalogueRow]:
    """The parent's catalogue rows. A parent without a catalogue gives bare rows: id, popularity, and a
    thumbnail of the product's image where that can still be found."""
    if artifact.catalogue_path is not None:
        with Catalogue.open(artifact.catalogue_path) as catalogue:
            yield from catalogue.rows()
        return
    images = {record["id"]: record for record in artifact.products()}
    for category in sorted(artifact.categories):
        for row, product_id in enumerate(artifact.read_ids(category)):
            thumbnail, media_type = None, None
            image = _image_of(artifact, images.get(product_id, {}))
            if image is not None:
                try:
                    thumbnail, media_type = make_thumbnail(image)
                except CatalogueError as exc:
                    LOG.warning("no thumbnail for %s: %s", product_id, exc)
            yield CatalogueRow(Product(product_id), category, row, artifact.popularity.count(product_id), None,
                               thumbnail, media_type)


def carried_rows(artifact: Artifact, placed: Mapping[str, tuple[str, int]],
                 products: Mapping[str, Product] | None = None) -> Iterator[CatalogueRow]:
    """The parent's rows of the products still `placed`, at their new rows; their data from `products` where
    given. Thumbnails, popularity and dedup groups are carried over as stored."""
    products = products or {}
    for row in parent_rows(artifact):
        where = placed.get(row.product.id)
        if where is None:
            continue  # removed
        yield replace(row, product=products.get(row.product.id, row.product), category=where[0], row=where[1])


def carry_export(artifact: Artifact, export: ExportRecord, staging: Path) -> ExportRecord:
    """The parent's exported model, linked into the derived version: the same head and backbone embed it."""
    return stage_export(staging, artifact.path / export.folder, export.checked, export.min_cosine,
                        expected=export.files)


def carry_detector(artifact: Artifact, detector: DetectorRecord, staging: Path) -> DetectorRecord:
    """The parent's item detector, linked into the derived version (it does not depend on the catalogue)."""
    return stage_detector(staging, artifact.path / detector.folder, detector.max_abs_diff, detector.source,
                          expected=detector.files)


def derive(root: Path, artifact: Artifact, categories: list[CategoryData], products: list[dict], change: Change,
           fingerprint: dict, keep: int, started: float,
           catalogue: Iterable[CatalogueRow] | None = None) -> str:
    """Write the new version beside the parent and publish it atomically; returns the version name.

    The new version inherits what the catalogue was first built from (data, checkpoint source, split).
    `catalogue` (rows, read lazily) becomes its catalogue.sqlite; None: the version has none.
    """
    parent = artifact.manifest
    version = new_version(f"{artifact.version}|{change.to_dict()}")
    provenance = parent.provenance.derive(artifact.version, change)
    popularity = restricted_popularity(artifact, {record["id"]: record["category"] for record in products})
    with staged(root, version) as staging:
        write_version(staging, version, categories, fingerprint, artifact.checkpoint_path, popularity, products,
                      provenance, parent.exact_threshold, parent.approximate, progress=False, started=started,
                      catalogue=catalogue, examples=lambda folder: carry_examples(artifact.path, folder),
                      export=None if parent.export is None else partial(carry_export, artifact, parent.export),
                      detector=None if parent.detector is None else partial(carry_detector, artifact,
                                                                            parent.detector))
        publish(root, staging, keep)
    return version


def open_current(root: Path) -> Artifact:
    """Under the build lock: clear leftovers of killed builds, then open the published version."""
    clean_stale(root)
    return open_artifact(root)
