"""Product images -> index vectors through the shared embedder (or its export), on an executor.

The local executor (the default) decodes in threads (DataLoader workers for torch) while this process runs
the network; the Ray one streams the images through an actor pool (`training.exec`). Either way the vectors
come back here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.exec.executor import EmbedJob, Executor, ImageItem, LocalExecutor
from training.model.embedder import Embedder
from training.model.runtimes import Runtime, RuntimeName
from training.model.runtimes.torch_runtime import TorchRuntime

LOG = logging.getLogger(__name__)


def embed_product_files(embedder: Embedder, paths: Sequence[str | Path], batch_size: int = 64, workers: int = 2,
                        progress: bool = True, runtime: Runtime | None = None, executor: Executor | None = None,
                        load: Callable[[str], Embedder] | None = None,
                        runtime_name: RuntimeName = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Index vectors [n, dim] of product images (paths or URIs) and a bool mask of the ones that could be read.

    `runtime` runs the network here (`training.model.batch_runtime`: OpenVINO over the build's export on a CPU);
    None runs the embedder itself in torch. A remote `executor` (Ray) rebuilds the embedder on each worker with
    `load` (device -> Embedder) and runs `runtime_name` there."""
    executor = executor if executor is not None else LocalExecutor(workers)
    opened = runtime if runtime is not None else TorchRuntime(embedder)
    job = EmbedJob("product", load, runtime_name, batch_size, loaded=embedder, opened=opened)
    vectors = np.zeros((len(paths), embedder.dim), dtype=np.float32)
    readable = np.zeros(len(paths), dtype=bool)
    items = [ImageItem(str(path)) for path in paths]
    with tqdm(total=len(items), desc="embed products", unit="img", disable=not progress) as bar:
        for chunk in executor.map_embed(job, items):
            for position, error, _ in chunk.errors:
                LOG.warning("skipping unreadable product image %s: %s", items[position].location, error)
            if len(chunk.positions):
                vectors[chunk.positions] = chunk.values
                readable[chunk.positions] = True
            bar.update(len(chunk.positions) + len(chunk.errors))
    return vectors, readable
