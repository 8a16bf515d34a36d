"""Product images -> index vectors through the shared embedder (or its export), decoding in DataLoader workers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.model.embedder import Embedder
from training.model.preprocess import Preprocess, load_crop
from training.model.runtimes import Runtime
from training.model.runtimes.torch_runtime import TorchRuntime

LOG = logging.getLogger(__name__)


class ProductImages(Dataset):
    """Decoded, preprocessed product images; an unreadable file yields a zero tensor and ok=False.

    Holds only the preprocessing (picklable, no model), and runs the embedder module's own `load_crop`,
    so workers apply exactly the embedder's decode and preprocessing.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, bool]:
        try:
            return load_crop(self.paths[position], None, self.preprocess), True
        except (OSError, ValueError) as exc:  # PIL raises both for truncated or foreign files
            LOG.warning("skipping unreadable product image %s: %s", self.paths[position], exc)
            size = self.preprocess.image_size
            return torch.zeros(3, size, size), False


def embed_product_files(embedder: Embedder, paths: Sequence[Path], batch_size: int = 64, workers: int = 2,
                        progress: bool = True, runtime: Runtime | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index vectors [n, dim] of product image files and a bool mask of the ones that could be read.

    `runtime` runs the network (`training.model.batch_runtime`: OpenVINO over the build's export on a CPU);
    None runs the embedder itself in torch."""
    runtime = runtime if runtime is not None else TorchRuntime(embedder)
    images = ProductImages(paths, embedder.preprocess)
    loader = DataLoader(
        images,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=embedder.device.type == "cuda",
        # Workers decode JPEGs while the main process runs the network: the build keeps pace with
        # the bare forward pass instead of alternating decode and compute.
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
    vectors = np.zeros((len(images), embedder.dim), dtype=np.float32)
    readable = np.zeros(len(images), dtype=bool)
    start = 0
    with tqdm(total=len(images), desc="embed products", unit="img", disable=not progress) as bar:
        for batch, ok in loader:
            end = start + len(batch)
            vectors[start:end] = runtime.vectors(batch.numpy(), "product")
            readable[start:end] = ok.numpy()
            start = end
            bar.update(len(batch))
    return vectors, readable

