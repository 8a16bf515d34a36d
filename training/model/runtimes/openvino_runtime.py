"""OpenVINO on the CPU: f32 by default, bf16 where the CPU has it.

OpenVINO silently runs bf16 on CPUs with AVX-512 BF16 / AMX unless told otherwise, so the precision hint
is always set explicitly: an index built in f32 is queried in f32 unless bf16 is asked for.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from training.data.stl import Kind
from training.model.runtimes.base import (
    ExportManifest,
    GraphRuntime,
    Precision,
    RuntimeUnavailable,
    check_precision,
)

try:
    import openvino as ov
except ImportError:  # optional: the serving image installs the runtime it uses
    ov = None

LOG = logging.getLogger(__name__)


def cpu_supports_bf16(core: ov.Core | None = None) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 natively here (AVX-512 BF16 or AMX)."""
    if ov is None:
        return False
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoRuntime(GraphRuntime):
    """The exported graphs compiled for OpenVINO's CPU plugin, one infer request per calling thread."""

    name = "openvino"

    def __init__(
        self,
        export_dir: str | Path,
        precision: Precision = "f32",
        threads: int | None = None,
        device: str = "cpu",
        verify: bool = True,
    ) -> None:
        if ov is None:
            raise RuntimeUnavailable("openvino is not installed (pip install openvino)")
        if device not in ("cpu", "auto"):
            raise RuntimeUnavailable(f"the openvino runtime runs on the cpu, not {device!r}; use onnxruntime")
        check_precision(precision)
        core = ov.Core()
        if precision == "bf16" and not cpu_supports_bf16(core):
            raise RuntimeUnavailable(
                "precision bf16 needs a CPU with AVX-512 BF16 or AMX; OpenVINO reports "
                f"{core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}; use f32"
            )
        manifest = ExportManifest.read(export_dir)
        if verify:
            manifest.verify(export_dir)
        super().__init__(manifest, precision)
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": precision,
            # LATENCY: one stream, all threads on each request. THROUGHPUT splits the threads into streams
            # that only pay off with several requests in flight; the service sends one batch at a time.
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        export_dir = Path(export_dir)

        def compile_graph(name: str) -> ov.CompiledModel:
            return core.compile_model(core.read_model(export_dir / name), "CPU", config)

        self._backbone = compile_graph(manifest.backbone_file)
        by_file = {name: compile_graph(name) for name in set(manifest.head_files.values())}
        self._heads = {kind: by_file[name] for kind, name in manifest.head_files.items()}
        # An InferRequest is not thread-safe and a service calls from a thread pool: one per thread.
        self._local = threading.local()
        LOG.info("openvino on CPU, %s, %s threads", precision, self._backbone.get_property("INFERENCE_NUM_THREADS"))

    def _request(self, key: str, compiled: ov.CompiledModel) -> ov.InferRequest:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        if key not in requests:
            requests[key] = compiled.create_infer_request()
        return requests[key]

    def _run_backbone(self, batch: np.ndarray) -> np.ndarray:
        request = self._request("backbone", self._backbone)
        request.infer({0: batch})
        return request.get_output_tensor(0).data.copy()  # the request reuses its buffer on the next call

    def _run_head(self, features: np.ndarray, kind: Kind) -> np.ndarray:
        request = self._request(kind, self._heads[kind])
        request.infer({0: features})
        return request.get_output_tensor(0).data.copy()
