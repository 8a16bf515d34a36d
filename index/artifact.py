"""Reading a published index artifact: the loader API the service codes against.

Layout of an artifact root:
    versions/<version>/manifest.json   what was built, from what, with the sha256 of every file
    versions/<version>/model.pt        copy of the head checkpoint, so the root is all a service needs
    versions/<version>/<slug>.faiss    one FAISS index per category (faiss ids = row positions)
    versions/<version>/<slug>.ids.json product id of each row
    versions/<version>/<slug>.vectors.npy  the rows themselves, so add/remove never re-embed
    versions/<version>/products.json   product id, category, image reference
    versions/<version>/popularity.json popularity of the training pairs
    versions/<version>/export/         the head and backbone as ONNX graphs + their manifest.json, for a
                                       server without torch (optional: manifest `export`, its sha256s)
    versions/<version>/detector/       the item detector: detector.pt, its ONNX graph and detector.json
                                       (optional: manifest `detector`, its sha256s)
    current -> versions/<version>      switched atomically by `index.publish`
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.ann import apply_search_params
from index.catalogue import CATALOGUE_FILE
from index.errors import ArtifactError, ArtifactMissing, CorruptArtifact, IndexMismatch
from index.manifest import MANIFEST_FILE, CategoryEntry, Manifest, read_manifest
from training.data.popularity import Popularity
from training.io import file_sha256

LOG = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
PRODUCTS_FILE = "products.json"
PRODUCT_KEYS = ("id", "category", "image")  # what each products.json record holds
POPULARITY_FILE = "popularity.json"
VERSIONS_DIR = "versions"
CURRENT_LINK = "current"
MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems: a longer version name cannot exist
# Fingerprint fields that must agree between the manifest and the embedder that queries the indexes.
FINGERPRINT_FIELDS = ("backbone", "backbone_weights_sha256", "head_sha256", "dim", "preprocess", "metric")


def versions_dir(root: Path) -> Path:
    return Path(root) / VERSIONS_DIR


def list_versions(root: Path) -> list[str]:
    """Published version names, oldest first (names sort by their UTC timestamp prefix)."""
    folder = versions_dir(root)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def latest_version(root: Path) -> str | None:
    versions = list_versions(root)
    return versions[-1] if versions else None


def current_version(root: Path) -> str | None:
    """The version the `current` link points at, or None when nothing is published."""
    link = Path(root) / CURRENT_LINK
    if not link.is_symlink():
        return None
    target = Path(link.readlink())
    return target.name if (versions_dir(root) / target.name).is_dir() else None


class CategoryIndex:
    """One category's FAISS index and the product id of each of its rows."""

    def __init__(self, category: str, index: faiss.Index, product_ids: list[str]) -> None:
        if index.ntotal != len(product_ids):
            raise CorruptArtifact(f"category {category!r}: index has {index.ntotal} rows but {len(product_ids)} ids")
        self.category = category
        self.index = index
        self.product_ids = product_ids
        self.dim: int = index.d
        # Search parameters are set once at load, never per call: concurrent searches (faiss releases
        # the GIL) then only read shared state, which faiss CPU indexes allow.

    @property
    def size(self) -> int:
        return len(self.product_ids)

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (product id, inner product) per query row; k is capped at the index size."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected query vectors of shape [n, {self.dim}], got {np.shape(vectors)}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, self.size)
        if k == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        scores, rows = self.index.search(queries, k)
        # Approximate indexes may return fewer than k hits (-1 rows) when few lists are probed.
        return [
            [(self.product_ids[row], float(score)) for score, row in zip(score_row, row_ids, strict=True) if row >= 0]
            for score_row, row_ids in zip(scores, rows, strict=True)
        ]


@dataclass
class Artifact:
    """One version directory (published or staged), opened through its typed manifest."""

    version: str
    path: Path
    manifest: Manifest
    categories: dict[str, int] = field(default_factory=dict)  # category path -> product count
    _popularity: Popularity | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def catalogue_path(self) -> Path | None:
        """The product catalogue (SQLite), or None for versions built before it existed."""
        path = self.path / CATALOGUE_FILE
        return path if path.is_file() else None

    @property
    def popularity(self) -> Popularity:
        if self._popularity is None:
            try:
                self._popularity = Popularity.from_json(self.path / POPULARITY_FILE)
            except (OSError, ValueError) as exc:
                raise CorruptArtifact(f"{self.path / POPULARITY_FILE}: {exc}") from exc
        return self._popularity

    @classmethod
    def from_dir(cls, path: Path) -> Artifact:
        """Open one version directory (published or staged) by reading its manifest."""
        path = Path(path)
        manifest = read_manifest(path / MANIFEST_FILE)
        categories = {name: entry.count for name, entry in manifest.categories.items()}
        return cls(version=manifest.version, path=path, manifest=manifest, categories=categories)

    @property
    def export_dir(self) -> Path | None:
        """The exported model's folder (`training.model.runtimes.load_runtime(name, export_dir)`), or None
        for versions without one."""
        export = self.manifest.export
        return None if export is None else self.path / export.folder

    @property
    def detector_dir(self) -> Path | None:
        """The item detector's folder (`training.model.detect_post.DetectorGraph(folder)`), or None for versions
        without one."""
        detector = self.manifest.detector
        return None if detector is None else self.path / detector.folder

    def _check_folder(self, folder: str, files: dict[str, str]) -> list[str]:
        problems = []
        for name, expected in sorted(files.items()):
            file = self.path / folder / name
            if not file.is_file():
                problems.append(f"{folder}/{name}: missing")
            elif file_sha256(file) != expected:
                problems.append(f"{folder}/{name}: sha256 differs from the manifest (corrupt or modified)")
        return problems

    def check_export(self) -> list[str]:
        """Problems comparing the export folder's files with the sha256s the manifest recorded."""
        export = self.manifest.export
        return [] if export is None else self._check_folder(export.folder, export.files)

    def check_detector(self) -> list[str]:
        """Problems comparing the detector folder's files with the sha256s the manifest recorded."""
        detector = self.manifest.detector
        return [] if detector is None else self._check_folder(detector.folder, detector.files)

    def fingerprint(self) -> dict:
        """The fingerprint of the embedder this version was built with, as `Embedder.fingerprint()` gives it."""
        return self.manifest.embedder.to_dict()

    def check_embedder(self, fingerprint: dict) -> None:
        """Raise IndexMismatch naming every field where the embedder differs from the one that built this."""
        built_with = self.fingerprint()
        reasons = []
        for name in FINGERPRINT_FIELDS:
            if built_with.get(name) != fingerprint.get(name):
                reasons.append(f"{name}: index has {_short(built_with.get(name))}, "
                               f"embedder has {_short(fingerprint.get(name))}")
        if reasons:
            raise IndexMismatch(
                f"index version {self.version} was built with another embedder ("
                + "; ".join(reasons)
                + f"); load the embedder from {self.checkpoint_path} or rebuild the index"
            )

    def verify_files(self, names: set[str] | None = None) -> list[str]:
        """Problems comparing the files (all, or those `names`) with the sha256 the manifest recorded."""
        problems = []
        for name, expected in sorted(self.manifest.files.items()):
            if names is not None and name not in names:
                continue
            file = self.path / name
            if not file.is_file():
                problems.append(f"{name}: missing")
            elif file_sha256(file) != expected:
                problems.append(f"{name}: sha256 differs from the manifest (corrupt or modified)")
        return problems

    def check_files(self) -> list[str]:
        """The one file check: every recorded file (the export's and the detector's too) matches its sha256,
        every category's files are recorded."""
        problems = self.verify_files() + self.check_export() + self.check_detector()
        for entry in self.manifest.categories.values():
            problems += [f"{name}: not in the manifest's file list" for name in entry.files
                         if name not in self.manifest.files]
        return problems

    def entry(self, category: str) -> CategoryEntry:
        try:
            return self.manifest.categories[category]
        except KeyError:
            raise ArtifactError(f"version {self.version} has no category {category!r}") from None

    def read_ids(self, category: str) -> list[str]:
        entry = self.entry(category)
        try:
            ids = json.loads((self.path / entry.ids_file).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptArtifact(f"category {category!r}: unreadable id file: {exc}") from exc
        if not isinstance(ids, list) or len(ids) != entry.count:
            raise CorruptArtifact(f"category {category!r}: id file does not hold {entry.count} ids")
        return [str(pid) for pid in ids]

    def read_vectors(self, category: str, mmap: bool = False) -> np.ndarray:
        """The category's stored rows; with `mmap` a read-only memory map (rows are read from disk when used)."""
        entry, dim = self.entry(category), self.manifest.embedder.dim
        try:
            vectors = np.load(self.path / entry.vectors_file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CorruptArtifact(f"category {category!r}: unreadable vectors file: {exc}") from exc
        if vectors.shape != (entry.count, dim):
            raise CorruptArtifact(f"category {category!r}: vectors have shape {vectors.shape}, manifest says "
                                  f"({entry.count}, {dim})")
        return vectors.astype(np.float32, copy=False)

    def read_index(self, category: str) -> faiss.Index:
        entry, dim = self.entry(category), self.manifest.embedder.dim
        file = self.path / entry.index_file
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:  # faiss reports unreadable and truncated files as RuntimeError
            raise CorruptArtifact(f"category {category!r}: corrupt index file {file}: {exc}") from exc
        if index.ntotal != entry.count or index.d != dim:
            raise CorruptArtifact(f"category {category!r}: index holds {index.ntotal}x{index.d}, manifest says "
                                  f"{entry.count}x{dim}")
        apply_search_params(index, entry.search_params)
        return index

    def load_indexes(self, verify_checksums: bool = True) -> dict[str, CategoryIndex]:
        """Every category's index, ready to search; ArtifactError on a missing, modified or corrupt file."""
        if verify_checksums:
            index_files = {name for c in self.categories for name in (self.entry(c).index_file,
                                                                       self.entry(c).ids_file)}
            problems = self.verify_files(index_files)
            if problems:
                raise CorruptArtifact(f"index version {self.version} is corrupt: " + "; ".join(problems))
        indexes = {category: CategoryIndex(category, self.read_index(category), self.read_ids(category))
                   for category in self.categories}
        LOG.info("loaded %d category indexes (%d products) of version %s", len(indexes),
                 sum(self.categories.values()), self.version)
        return indexes

    def products(self) -> list[dict]:
        """The products.json records: {"id", "category", "image"}; CorruptArtifact for any other shape (the
        edit commands index them by id and category)."""
        path = self.path / PRODUCTS_FILE
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptArtifact(f"{path} is unreadable: {exc}") from exc
        if not isinstance(records, list):
            raise CorruptArtifact(f"{path} is corrupt: expected a list of products")
        for number, record in enumerate(records, start=1):
            if not (isinstance(record, dict) and all(isinstance(record.get(key), str) for key in PRODUCT_KEYS)):
                raise CorruptArtifact(f"{path} is corrupt: product {number} is not an object with string "
                                      f"{list(PRODUCT_KEYS)}")
        return records


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_version_name(version: str) -> bool:
    """Whether `version` can name a directory of versions/: one path component, within NAME_MAX bytes."""
    return (version not in ("", ".", "..") and not {"/", "\\", "\x00"} & set(version)
            and len(os.fsencode(version)) <= MAX_NAME_BYTES)


def open_artifact(root: Path, version: str | None = None) -> Artifact:
    """Open a published version of the artifact at `root` (None = the one `current` points at)."""
    root = Path(root)
    if version is None:
        version = current_version(root)
        if version is None:
            raise ArtifactMissing(f"no index version is published under {root} (no valid '{CURRENT_LINK}' link); "
                                  "run `python -m index build` first")
    if not is_version_name(version):  # a path such as '../x', or past the file system's name limit
        raise ArtifactMissing(f"{_short(version)} is not an index version name; available: {list_versions(root)}")
    path = versions_dir(root) / version
    if not path.is_dir():
        raise ArtifactMissing(f"index version {version!r} does not exist under {root}; "
                              f"available: {list_versions(root)}")
    artifact = Artifact.from_dir(path)
    if artifact.version != version:
        raise CorruptArtifact(f"{path} holds manifest of version {artifact.version}, not {version}")
    return artifact
