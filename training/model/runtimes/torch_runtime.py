"""The reference runtime: today's `Embedder` (traced and frozen on a CPU) behind the numpy `Runtime` interface.

The one runtime module that imports torch; the exported runtimes are checked against it.
"""

from __future__ import annotations

import numpy as np
import torch

from training.data.stl import Kind
from training.model.embedder import Embedder
from training.model.runtimes.base import Precision, RuntimeUnavailable, check_precision


class TorchRuntime:
    name = "torch"

    def __init__(self, embedder: Embedder, precision: Precision = "f32", threads: int | None = None) -> None:
        if check_precision(precision) != "f32":
            raise RuntimeUnavailable(f"the torch runtime runs f32 on a CPU, not {precision}")
        if threads is not None:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model thread pool
        self.embedder = embedder
        self.precision = precision
        self.fingerprint = embedder.fingerprint()

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def backbone_features(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return self.embedder.backbone_features(tensor).numpy()

    def project(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        return self.embedder.project(features, kind)

    def vectors(self, batch: np.ndarray, kind: Kind) -> np.ndarray:
        return self.project(self.backbone_features(batch), kind)
