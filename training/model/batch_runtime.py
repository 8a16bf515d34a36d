"""The runtime the offline batch jobs (feature cache, catalogue embedding) run the embedder through.

`auto` is OpenVINO over an export on a CPU (about twice torch's forward pass there: see
benchmarks/bench_runtimes.py) and torch on a GPU. The backbone is frozen and its exported features equal
torch's within FEATURE_TOLERANCE in f32, so a feature cache filled by either runtime is one cache: the runtime
is not part of its key. `batch_runtime` checks that tolerance on a seeded batch before it hands a runtime out,
so a cache can never mix numbers that differ more.

The tolerance is relative to the largest feature: efficientnet_lite0's pooled features reach ~5.6 on the
seeded batch, OpenVINO f32 differs from torch by at most 7.2e-6 there (1.3e-6 relative), while torch's own
eager and frozen (jit) forward passes, which share a cache today, differ by 1.1e-5.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from training.model.embedder import Embedder
from training.model.export import can_export, check_batch_for, export_embedder
from training.model.runtimes import RUNTIMES, Runtime, RuntimeName, installed, load_runtime
from training.model.runtimes.base import MANIFEST_FILE, ExportMismatch, RuntimeUnavailable

LOG = logging.getLogger(__name__)

FEATURE_TOLERANCE = 1e-5  # max abs difference to torch's backbone features, relative to the largest feature
RUNTIME_CHOICES: tuple[str, ...] = ("auto", *RUNTIMES)
_CHECK_BATCH = 2


def choose_runtime(name: RuntimeName, embedder: Embedder) -> str:
    """`auto`: torch on a GPU; on a CPU OpenVINO, else ONNX Runtime, else torch (what is installed)."""
    if name != "auto":
        if name not in RUNTIMES:
            raise RuntimeUnavailable(f"unknown runtime {name!r}; use one of {list(RUNTIME_CHOICES)}")
        if name != "torch" and embedder.device.type != "cpu":
            raise RuntimeUnavailable(f"the batch jobs run {name} on a CPU only; the embedder is on {embedder.device}")
        return name
    if embedder.device.type != "cpu":
        return "torch"
    if can_export():
        for candidate in ("openvino", "onnxruntime"):
            if installed(candidate):
                return candidate
    LOG.info("no exported runtime here (onnx, openvino or onnxruntime missing): the backbone runs in torch")
    return "torch"


def feature_difference(embedder: Embedder, runtime: Runtime, batch: int = _CHECK_BATCH) -> float:
    """Max abs difference between the runtime's backbone features and torch's on a seeded batch, divided by
    the largest abs feature (1.0 at least, so near-zero features are compared absolutely)."""
    images = check_batch_for(embedder.backbone.image_size, batch)
    reference = embedder.backbone_features(torch.from_numpy(images)).numpy()
    scale = max(1.0, float(np.max(np.abs(reference))))
    return float(np.max(np.abs(runtime.backbone_features(images) - reference))) / scale


@contextmanager
def batch_runtime(embedder: Embedder, name: RuntimeName = "auto", export_dir: Path | None = None,
                  threads: int | None = None) -> Iterator[Runtime]:
    """The runtime to run `embedder` with in a batch job, alive for the `with` block.

    An exported runtime runs `export_dir` when it holds an export (the index build passes the one it has just
    checked), else the embedder exported into a temporary folder (a few seconds, once per job). Raises
    ExportMismatch when that export is another model's or its features are not torch's within tolerance.
    """
    resolved = choose_runtime(name, embedder)
    if resolved == "torch":
        yield load_runtime("torch", embedder=embedder, threads=threads)
        return
    reuse = export_dir is not None and (Path(export_dir) / MANIFEST_FILE).is_file()
    with nullcontext(export_dir) if reuse else tempfile.TemporaryDirectory(prefix="stl-export-") as folder:
        if not reuse:
            export_embedder(embedder, folder)
        runtime = load_runtime(resolved, folder, threads=threads, device="cpu")  # type: ignore[arg-type]
        if runtime.fingerprint != embedder.fingerprint():
            raise ExportMismatch(f"{folder} holds another model's export than the embedder's")
        difference = feature_difference(embedder, runtime)
        if not difference <= FEATURE_TOLERANCE:  # also refuses NaN
            raise ExportMismatch(f"{resolved} backbone features differ from torch's by {difference:.2e} of the "
                                 f"largest feature (> {FEATURE_TOLERANCE}); run the job with --runtime torch")
        LOG.info("batch jobs run the backbone in %s (features within %.1e of torch's)", resolved, difference)
        yield runtime
