"""What every runtime shares: the export manifest (written by `training.model.export`, read here), the
`Runtime` interface and the input checks. numpy only: a serving process imports this without torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from training.data.stl import KINDS, Kind
from training.errors import DataError, ModelMismatch, Unavailable
from training.io import file_sha256

LOG = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
INPUT_NAME = "images"  # backbone graph: [B, 3, S, S] float32 NCHW, normalised as `arrays.to_array` does
FEATURES_NAME = "features"  # backbone output and head input: [B, backbone_dim]
VECTORS_NAME = "vectors"  # head output: [B, dim], unit rows
Precision = Literal["f32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("f32", "bf16")


class ExportMismatch(ModelMismatch):
    """An exported model does not match its manifest, its files or the embedder it claims to be."""


class RuntimeUnavailable(Unavailable):
    """The runtime, its device or the asked precision cannot be had here (package, CUDA, BF16 support)."""


@dataclass(frozen=True)
class ExportManifest:
    """The contract of an export folder: written once by `export_embedder`, read by every runtime."""

    opset: int
    image_size: int
    backbone_dim: int
    dim: int
    backbone_file: str
    head_files: dict[str, str]  # kind -> file; one file for both kinds when the head's branch is shared
    sha256: dict[str, str]  # file -> sha256 of its bytes
    fingerprint: dict[str, Any]  # `Embedder.fingerprint()` of the model exported: what an index must match
    exporter: str = ""  # e.g. "torch 2.14.1 torchscript-onnx"
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExportManifest:
        try:
            manifest = cls(
                opset=int(raw["opset"]),
                image_size=int(raw["image_size"]),
                backbone_dim=int(raw["backbone_dim"]),
                dim=int(raw["dim"]),
                backbone_file=str(raw["backbone_file"]),
                head_files={str(kind): str(name) for kind, name in raw["head_files"].items()},
                sha256={str(name): str(digest) for name, digest in raw["sha256"].items()},
                fingerprint=dict(raw["fingerprint"]),
                exporter=str(raw.get("exporter", "")),
                format_version=int(raw.get("format_version", FORMAT_VERSION)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportMismatch(f"not an export manifest ({type(exc).__name__}: {exc})") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ExportMismatch(f"export format {manifest.format_version} is not the supported {FORMAT_VERSION}")
        if set(manifest.head_files) != set(KINDS):
            raise ExportMismatch(f"export manifest has heads for {sorted(manifest.head_files)}, not {list(KINDS)}")
        return manifest

    @classmethod
    def read(cls, export_dir: str | Path) -> ExportManifest:
        path = Path(export_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"{export_dir} holds no exported model ({MANIFEST_FILE} is missing)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ExportMismatch(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    def files(self) -> list[str]:
        return sorted({self.backbone_file, *self.head_files.values()})

    def verify(self, export_dir: str | Path) -> None:
        """Every graph file is there with the checksum the manifest recorded (a half-copied folder fails)."""
        for name in self.files():
            path = Path(export_dir) / name
            if not path.is_file():
                raise ExportMismatch(f"exported model file {path} is missing")
            expected = self.sha256.get(name)
            if expected is None or file_sha256(path) != expected:
                raise ExportMismatch(f"{path} does not match the sha256 its manifest recorded")


@runtime_checkable
class Runtime(Protocol):
    """Image batch -> backbone features -> unit vectors, the two stages of `Embedder` on numpy arrays."""

    name: str
    precision: str
    dim: int
    fingerprint: dict[str, Any]

    def backbone_features(self, batch: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] float32 (from `arrays.to_array`) -> [B, backbone_dim] float32."""
        ...

    def project(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        """[B, backbone_dim] -> [B, dim] float32 unit rows for a scene crop or a product image."""
        ...

    def vectors(self, batch: np.ndarray, kind: Kind) -> np.ndarray:
        """`project(backbone_features(batch), kind)`."""
        ...


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'scene' or 'product', got {kind!r}")
    return kind  # type: ignore[return-value]


def check_batch(batch: np.ndarray, image_size: int) -> np.ndarray:
    """The batch as C-contiguous float32 [B, 3, S, S], or a ValueError naming the shape it has."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[1:] != (3, image_size, image_size):
        raise ValueError(f"expected a batch [B, 3, {image_size}, {image_size}] from to_array(), got {batch.shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_features(features: np.ndarray, backbone_dim: int) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != backbone_dim:
        raise ValueError(f"expected backbone features [B, {backbone_dim}], got shape {features.shape}")
    return np.ascontiguousarray(features, dtype=np.float32)


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise DataError(f"unknown precision {precision!r}; use one of {list(PRECISIONS)}")
    return precision  # type: ignore[return-value]


class GraphRuntime:
    """Shared shape of the exported-graph runtimes: the manifest's checks around two `_run_*` calls."""

    name = "graph"

    def __init__(self, manifest: ExportManifest, precision: Precision = "f32") -> None:
        self.manifest = manifest
        self.precision = precision
        self.fingerprint = dict(manifest.fingerprint)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def _run_backbone(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _run_head(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        raise NotImplementedError

    def backbone_features(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.manifest.image_size)
        if len(batch) == 0:
            return np.zeros((0, self.manifest.backbone_dim), dtype=np.float32)
        return np.asarray(self._run_backbone(batch), dtype=np.float32)

    def project(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        kind = check_kind(kind)
        features = check_features(features, self.manifest.backbone_dim)
        if len(features) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._run_head(features, kind), dtype=np.float32)

    def vectors(self, batch: np.ndarray, kind: Kind) -> np.ndarray:
        return self.project(self.backbone_features(batch), kind)
