"""An artifact version's manifest.json as types, read and written here only.

The JSON is flat (one object; `categories` maps each category path to its entry). `Provenance` groups
the keys that say where a version came from; they sit in the same object, between `categories` and
`index_seconds`. Keys whose value a version does not have (a derived version has no `device`) are left
out, as they always were; `parent_version` is always written (null for a full build).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from index.ann import Approximate, IndexSpec
from index.errors import CorruptArtifact
from training.io import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
# One space per level: manifests of many categories stay readable without doubling in size.
JSON_INDENT = 1

IndexKind = Literal["exact", "approximate"]


class _Fields:
    """Typed access to the keys of one JSON object; every problem names where the object came from."""

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise CorruptArtifact(f"{where}: expected an object, got {type(raw).__name__}")
        self.raw, self.where = raw, where

    def _get(self, key: str, check: Callable[[object], bool], wanted: str, optional: bool) -> Any:
        if self.raw.get(key) is None:
            if optional:
                return None
            raise CorruptArtifact(f"{self.where} lacks the field {key!r}")
        value = self.raw[key]
        if not check(value):
            raise CorruptArtifact(f"{self.where}: field {key!r} should be {wanted}, got {value!r}")
        return value

    def text(self, key: str, optional: bool = False) -> Any:
        return self._get(key, lambda v: isinstance(v, str), "a string", optional)

    def integer(self, key: str, optional: bool = False) -> Any:
        return self._get(key, _is_int, "an integer", optional)

    def number(self, key: str, optional: bool = False) -> float | None:
        value = self._get(key, lambda v: _is_int(v) or isinstance(v, float), "a number", optional)
        return None if value is None else float(value)

    def mapping(self, key: str, optional: bool = False) -> Any:
        return self._get(key, lambda v: isinstance(v, dict), "an object", optional)

    def texts(self, key: str, optional: bool = False) -> list[str] | None:
        value = self._get(key, lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                          "a list of strings", optional)
        return None if value is None else list(value)

    def choice(self, key: str, allowed: tuple[str, ...]) -> Any:
        return self._get(key, lambda v: v in allowed, f"one of {list(allowed)}", optional=False)

    def nested(self, key: str) -> _Fields:
        return _Fields(self.mapping(key), f"{self.where}: {key}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CategoryEntry:
    """One category's files and index type (faiss ids are row positions of its vectors file)."""

    slug: str
    index_file: str
    ids_file: str
    vectors_file: str
    count: int
    kind: IndexKind
    factory: str  # faiss.index_factory string
    search_params: dict[str, int] = field(default_factory=dict)
    tuning_recall_at_50: float | None = None

    @classmethod
    def named(cls, slug: str, count: int, spec: IndexSpec, tuning_recall: float | None) -> CategoryEntry:
        """The entry of a category written under `slug`: the one place file names are made."""
        return cls(slug, f"{slug}.faiss", f"{slug}.ids.json", f"{slug}.vectors.npy", count, spec.kind,
                   spec.factory, dict(spec.search_params), tuning_recall)

    @property
    def files(self) -> tuple[str, str, str]:
        return self.index_file, self.ids_file, self.vectors_file

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec(self.factory, self.kind, dict(self.search_params))

    def to_dict(self) -> dict[str, Any]:
        return {
            "slug": self.slug,
            "index_file": self.index_file,
            "ids_file": self.ids_file,
            "vectors_file": self.vectors_file,
            "count": self.count,
            "kind": self.kind,
            "factory": self.factory,
            "search_params": dict(self.search_params),
            "tuning_recall_at_50": self.tuning_recall_at_50,
        }

    @classmethod
    def from_dict(cls, raw: object, where: str) -> CategoryEntry:
        entry = _Fields(raw, where)
        params = entry.mapping("search_params", optional=True) or {}
        if not all(isinstance(name, str) and _is_int(value) for name, value in params.items()):
            raise CorruptArtifact(f"{where}: search_params should map names to integers, got {params!r}")
        return cls(
            slug=entry.text("slug"),
            index_file=entry.text("index_file"),
            ids_file=entry.text("ids_file"),
            vectors_file=entry.text("vectors_file"),
            count=entry.integer("count"),
            kind=entry.choice("kind", get_args(IndexKind)),
            factory=entry.text("factory"),
            search_params=dict(params),
            tuning_recall_at_50=entry.number("tuning_recall_at_50", optional=True),
        )


@dataclass(frozen=True)
class EmbedderFingerprint:
    """What must match between an index and the embedder that queries it (`Embedder.fingerprint()`)."""

    backbone: str
    backbone_weights_sha256: str
    preprocess: dict[str, Any]
    head_sha256: str
    dim: int
    metric: str

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_dict(cls, raw: object, where: str = "embedder fingerprint") -> EmbedderFingerprint:
        fingerprint = _Fields(raw, where)
        return cls(
            backbone=fingerprint.text("backbone"),
            backbone_weights_sha256=fingerprint.text("backbone_weights_sha256"),
            preprocess=dict(fingerprint.mapping("preprocess")),
            head_sha256=fingerprint.text("head_sha256"),
            dim=fingerprint.integer("dim"),
            metric=fingerprint.text("metric"),
        )


@dataclass(frozen=True)
class SplitRecord:
    """The scene split whose training pairs the popularity table counts."""

    fractions: tuple[float, float, float]
    seed: int
    train_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions), "seed": self.seed, "train_pairs": self.train_pairs}

    @classmethod
    def from_dict(cls, split: _Fields) -> SplitRecord:
        fractions = split._get("fractions", lambda v: isinstance(v, list) and len(v) == 3 and all(
            _is_int(f) or isinstance(f, float) for f in v), "three numbers", optional=False)
        return cls(tuple(float(f) for f in fractions), split.integer("seed"),  # type: ignore[arg-type]
                   split.integer("train_pairs"))


@dataclass(frozen=True)
class Change:
    """What an incremental edit did to its parent version."""

    operation: str  # "add" or "remove"
    ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "ids": list(self.ids)}

    @classmethod
    def from_dict(cls, change: _Fields) -> Change:
        return cls(change.text("operation"), change.texts("ids") or [])


@dataclass(frozen=True)
class Provenance:
    """Where a version came from: the build's inputs and measurements, or the edit of its parent."""

    operation: str  # "build", "add", "remove" (benchmarks write their own)
    parent_version: str | None = None
    data_root: str | None = None
    # `index.build.catalogue_fingerprint` of what was indexed; the key is "data_fingerprint".
    catalogue_fingerprint: str | None = None
    checkpoint_source: str | None = None
    checkpoint_source_sha256: str | None = None
    split: SplitRecord | None = None
    skipped_products: list[str] | None = None
    device: str | None = None
    embed_seconds: float | None = None
    embed_products_per_second: float | None = None
    embed_runtime: str | None = None  # what ran the backbone over the catalogue: openvino, onnxruntime, torch
    change: Change | None = None

    def derive(self, parent_version: str, change: Change) -> Provenance:
        """A derived version's provenance: what the catalogue was first built from, plus this change."""
        return Provenance(
            operation=change.operation,
            parent_version=parent_version,
            data_root=self.data_root,
            catalogue_fingerprint=self.catalogue_fingerprint,
            checkpoint_source=self.checkpoint_source,
            checkpoint_source_sha256=self.checkpoint_source_sha256,
            split=self.split,
            change=change,
        )

    def to_dict(self) -> dict[str, Any]:
        optional = {
            "data_root": self.data_root,
            "data_fingerprint": self.catalogue_fingerprint,
            "checkpoint_source": self.checkpoint_source,
            "checkpoint_source_sha256": self.checkpoint_source_sha256,
            "split": None if self.split is None else self.split.to_dict(),
            "skipped_products": None if self.skipped_products is None else list(self.skipped_products),
            "device": self.device,
            "embed_seconds": self.embed_seconds,
            "embed_products_per_second": self.embed_products_per_second,
            "embed_runtime": self.embed_runtime,
            "change": None if self.change is None else self.change.to_dict(),
        }
        return {"operation": self.operation, "parent_version": self.parent_version,
                **{key: value for key, value in optional.items() if value is not None}}

    @classmethod
    def from_dict(cls, manifest: _Fields) -> Provenance:
        return cls(
            operation=manifest.text("operation"),
            parent_version=manifest.text("parent_version", optional=True),
            data_root=manifest.text("data_root", optional=True),
            catalogue_fingerprint=manifest.text("data_fingerprint", optional=True),
            checkpoint_source=manifest.text("checkpoint_source", optional=True),
            checkpoint_source_sha256=manifest.text("checkpoint_source_sha256", optional=True),
            split=None if manifest.raw.get("split") is None else SplitRecord.from_dict(manifest.nested("split")),
            skipped_products=manifest.texts("skipped_products", optional=True),
            device=manifest.text("device", optional=True),
            embed_seconds=manifest.number("embed_seconds", optional=True),
            embed_products_per_second=manifest.number("embed_products_per_second", optional=True),
            embed_runtime=manifest.text("embed_runtime", optional=True),
            change=None if manifest.raw.get("change") is None else Change.from_dict(manifest.nested("change")),
        )


@dataclass(frozen=True)
class ExportRecord:
    """The exported model a version carries in its `folder` (ONNX graphs + the export's own manifest.json,
    `training.model.export`): what a torch-free server runs. Each file's sha256 is recorded here, so the
    version's manifest covers the subfolder too; `checked` is the smallest cosine each runtime's vectors had
    to torch's on the build's seeded batch (none below `min_cosine`, or the build refused to publish)."""

    folder: str
    files: dict[str, str]  # file name inside `folder` -> sha256
    checked: dict[str, float]  # runtime name -> smallest cosine to torch
    min_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "files": dict(self.files), "checked": dict(self.checked),
                "min_cosine": self.min_cosine}

    @classmethod
    def from_dict(cls, export: _Fields) -> ExportRecord:
        files, checked = export.mapping("files"), export.mapping("checked")
        if not files or not all(isinstance(n, str) and isinstance(sha, str) for n, sha in files.items()):
            raise CorruptArtifact(f"{export.where}: files should map file names to sha256 strings")
        if not all(isinstance(n, str) and (_is_int(c) or isinstance(c, float)) for n, c in checked.items()):
            raise CorruptArtifact(f"{export.where}: checked should map runtime names to cosines")
        folder = export.text("folder")
        if "/" in folder or folder in ("", ".", ".."):
            raise CorruptArtifact(f"{export.where}: folder should be one plain name, got {folder!r}")
        return cls(folder, dict(files), {name: float(c) for name, c in checked.items()},
                   export.number("min_cosine"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class DetectorRecord:
    """The item detector a version carries in its `folder` (`detector.pt`, its ONNX graph and `detector.json`,
    `training.model.detect_post`): what /detect and /shop run. Each file's sha256 is recorded here, so the
    version's manifest covers the subfolder too; `max_abs_diff` is the largest raw-output difference of the
    graph to torch when the version was built."""

    folder: str
    files: dict[str, str]  # file name inside `folder` -> sha256
    categories: list[str]  # label index -> full category path
    image_size: int
    max_abs_diff: float | None = None
    source: str | None = None  # the checkpoint's path when the version was built

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "files": dict(self.files), "categories": list(self.categories),
                "image_size": self.image_size, "max_abs_diff": self.max_abs_diff, "source": self.source}

    @classmethod
    def from_dict(cls, detector: _Fields) -> DetectorRecord:
        files = detector.mapping("files")
        if not files or not all(isinstance(n, str) and isinstance(sha, str) for n, sha in files.items()):
            raise CorruptArtifact(f"{detector.where}: files should map file names to sha256 strings")
        folder = detector.text("folder")
        if "/" in folder or folder in ("", ".", ".."):
            raise CorruptArtifact(f"{detector.where}: folder should be one plain name, got {folder!r}")
        return cls(folder, dict(files), detector.texts("categories") or [], detector.integer("image_size"),
                   detector.number("max_abs_diff", optional=True), detector.text("source", optional=True))


@dataclass(frozen=True)
class Manifest:
    """What a version was built from and with, and the sha256 of every file in it."""

    version: str
    created_at: str  # ISO 8601, UTC, seconds
    embedder: EmbedderFingerprint
    checkpoint_file: str
    exact_threshold: int
    approximate: Approximate
    product_count: int
    categories: dict[str, CategoryEntry]
    provenance: Provenance
    index_seconds: float
    build_seconds: float
    files: dict[str, str]  # file name -> sha256 (top-level files; the export's are in `export.files`)
    format_version: int = FORMAT_VERSION
    # None: no exported model (versions built before exports, or with `--no-export`); the key is then absent.
    export: ExportRecord | None = None
    # None: no item detector (versions built before detectors, or without `--detector`); the key is then absent.
    detector: DetectorRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        embedder = self.embedder.to_dict()
        return {
            "format_version": self.format_version,
            "version": self.version,
            "created_at": self.created_at,
            # The fingerprint's fields also sit at the top, for people and tools reading the file.
            "backbone": embedder["backbone"],
            "backbone_weights_sha256": embedder["backbone_weights_sha256"],
            "preprocess": embedder["preprocess"],
            "head_sha256": embedder["head_sha256"],
            "checkpoint_file": self.checkpoint_file,
            "dim": embedder["dim"],
            "metric": embedder["metric"],
            "embedder": embedder,
            "exact_threshold": self.exact_threshold,
            "approximate": self.approximate,
            "product_count": self.product_count,
            "categories": {name: entry.to_dict() for name, entry in self.categories.items()},
            **self.provenance.to_dict(),
            "index_seconds": self.index_seconds,
            "build_seconds": self.build_seconds,
            "files": dict(self.files),
            **({} if self.export is None else {"export": self.export.to_dict()}),
            **({} if self.detector is None else {"detector": self.detector.to_dict()}),
        }

    @classmethod
    def from_dict(cls, raw: object, where: str = MANIFEST_FILE) -> Manifest:
        manifest = _Fields(raw, where)
        if manifest.raw.get("format_version") != FORMAT_VERSION:
            raise CorruptArtifact(f"{where} is not an index manifest of format {FORMAT_VERSION}")
        embedder = EmbedderFingerprint.from_dict(manifest.mapping("embedder"), f"{where}: embedder")
        for name, value in embedder.to_dict().items():
            if manifest.raw.get(name) != value:
                raise CorruptArtifact(f"{where}: top-level {name!r} {manifest.raw.get(name)!r} contradicts "
                                      f"the embedder fingerprint's {value!r}")
        files = manifest.mapping("files")
        if not all(isinstance(name, str) and isinstance(sha, str) for name, sha in files.items()):
            raise CorruptArtifact(f"{where}: files should map file names to sha256 strings")
        return cls(
            version=manifest.text("version"),
            created_at=manifest.text("created_at"),
            embedder=embedder,
            checkpoint_file=manifest.text("checkpoint_file"),
            exact_threshold=manifest.integer("exact_threshold"),
            approximate=manifest.choice("approximate", get_args(Approximate)),
            product_count=manifest.integer("product_count"),
            categories={name: CategoryEntry.from_dict(entry, f"{where}: category {name!r}")
                        for name, entry in manifest.mapping("categories").items()},
            provenance=Provenance.from_dict(manifest),
            index_seconds=manifest.number("index_seconds"),  # type: ignore[arg-type]
            build_seconds=manifest.number("build_seconds"),  # type: ignore[arg-type]
            files=dict(files),
            export=None if manifest.raw.get("export") is None else ExportRecord.from_dict(manifest.nested("export")),
            detector=(None if manifest.raw.get("detector") is None
                      else DetectorRecord.from_dict(manifest.nested("detector"))),
        )


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`; CorruptArtifact when it is missing, unreadable or not a manifest."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptArtifact(f"{path} is missing; the artifact is incomplete") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifact(f"{path} is unreadable: {exc}") from exc
    return Manifest.from_dict(raw, str(path))


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write atomically and fsynced: written last, a manifest says its version is complete."""
    write_json_atomic(path, manifest.to_dict(), indent=JSON_INDENT)
