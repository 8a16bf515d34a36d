"""Deriving a new version from the current one (incremental add/remove) without re-embedding the catalogue."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

from index.ann import choose_spec
from index.artifact import Artifact, open_artifact
from index.manifest import Change
from index.publish import clean_stale, publish, staging_dir
from index.writer import CategoryData, new_version, write_version
from training.data.popularity import Popularity
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


def derive(root: Path, artifact: Artifact, categories: list[CategoryData], products: list[dict], change: Change,
           fingerprint: dict, keep: int, started: float) -> str:
    """Write the new version beside the parent and publish it atomically; returns the version name.

    The new version inherits what the catalogue was first built from (data, checkpoint source, split).
    """
    parent = artifact.manifest
    version = new_version(f"{artifact.version}|{change.to_dict()}")
    provenance = parent.provenance.derive(artifact.version, change)
    popularity = restricted_popularity(artifact, {record["id"]: record["category"] for record in products})
    staging = staging_dir(root, version)
    write_version(staging, version, categories, fingerprint, artifact.checkpoint_path, popularity, products,
                  provenance, parent.exact_threshold, parent.approximate, progress=False, started=started)
    publish(root, staging, keep)
    return version


def open_current(root: Path) -> Artifact:
    """Under the build lock: clear leftovers of killed builds, then open the published version."""
    clean_stale(root)
    return open_artifact(root)
