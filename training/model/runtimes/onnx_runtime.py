"""ONNX Runtime: CPUExecutionProvider (intra-op threads settable), CUDAExecutionProvider when present."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from training.data.stl import Kind
from training.model.runtimes.base import (
    FEATURES_NAME,
    INPUT_NAME,
    VECTORS_NAME,
    ExportManifest,
    GraphRuntime,
    Precision,
    RuntimeUnavailable,
    check_precision,
)

try:
    import onnxruntime as ort
except ImportError:  # optional: the serving image installs the runtime it uses
    ort = None

LOG = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def providers_for(device: str) -> list[str]:
    """`cpu`, `cuda` (an error without the CUDA provider) or `auto` (CUDA when the provider is there)."""
    if ort is None:
        raise RuntimeUnavailable("onnxruntime is not installed (pip install onnxruntime)")
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU_PROVIDER]
    if device in ("cuda", "auto"):
        if CUDA_PROVIDER in available:
            return [CUDA_PROVIDER, CPU_PROVIDER]
        if device == "cuda":
            raise RuntimeUnavailable(
                f"onnxruntime has no {CUDA_PROVIDER} here (providers: {available}); "
                "install onnxruntime-gpu on a CUDA machine, or use device cpu"
            )
        return [CPU_PROVIDER]
    raise RuntimeUnavailable(f"onnxruntime runs on cpu or cuda, not {device!r}")


class OnnxRuntime(GraphRuntime):
    """The exported graphs in ONNX Runtime sessions (`InferenceSession.run` is thread-safe)."""

    name = "onnxruntime"

    def __init__(
        self,
        export_dir: str | Path,
        precision: Precision = "f32",
        threads: int | None = None,
        device: str = "cpu",
        verify: bool = True,
    ) -> None:
        if check_precision(precision) != "f32":
            raise RuntimeUnavailable(f"the onnxruntime runtime runs f32 only, not {precision}; use openvino")
        providers = providers_for(device)
        manifest = ExportManifest.read(export_dir)
        if verify:
            manifest.verify(export_dir)
        super().__init__(manifest, precision)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.inter_op_num_threads = 1  # a chain of convs: no parallel branches to run side by side
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        export_dir = Path(export_dir)

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(export_dir / name), sess_options=options, providers=providers)

        self.providers = providers
        self._backbone = session(manifest.backbone_file)
        by_file = {name: session(name) for name in set(manifest.head_files.values())}
        self._heads = {kind: by_file[name] for kind, name in manifest.head_files.items()}
        LOG.info("onnxruntime on %s, %s intra-op threads", providers[0], threads or "default")

    def _run_backbone(self, batch: np.ndarray) -> np.ndarray:
        return self._backbone.run([FEATURES_NAME], {INPUT_NAME: batch})[0]

    def _run_head(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        return self._heads[kind].run([VECTORS_NAME], {FEATURES_NAME: features})[0]
