"""The service's one image -> vector path: decode + crop + normalise (`training.model.arrays`, the same
pixels for every runtime) and a runtime's forward pass (`training.model.runtimes`).

Which runtime runs the forward pass is STL_RUNTIME's choice, made once per loaded version: `auto` is
OpenVINO over the version's exported model on a CPU (about twice torch's speed there, benchmarks/
bench_service.py) and torch on a GPU. A version without an export (built before exports, or with
`--no-export`), or an STL_CHECKPOINT override (a model the export is not), is served by torch, and says so
in /readyz. Only then is torch imported: a process serving an export never loads torch or timm.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from index.artifact import Artifact
from service.images import decode_image
from service.settings import Settings
from training.data.stl import BBox
from training.model.arrays import Preprocess, load_image_for, to_array
from training.model.runtimes import Runtime, RuntimeUnavailable, installed, load_runtime
from training.model.runtimes.base import check_precision
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

LOG = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


def runtime_precision(setting: str) -> str:
    """A precision as the settings spell it (STL_PRECISION, STL_DETECT_PRECISION: `fp32`, `bf16`, `auto`) in
    the runtimes' names (`f32`, `bf16`, `auto`)."""
    return "f32" if setting == "fp32" else setting


def gpu_present() -> bool:
    """Whether an NVIDIA driver is loaded here: asked without torch (torch later decides whether CUDA works)."""
    return _NVIDIA_DRIVER.exists()


def planned_device(settings: Settings) -> Device:
    """STL_DEVICE resolved without importing torch: `auto` is CUDA where an NVIDIA driver is loaded."""
    if settings.device.startswith("cuda"):
        return "cuda"
    return "cuda" if settings.device == "auto" and gpu_present() and installed("torch") else "cpu"


def planned_runtime(settings: Settings) -> str:
    """The runtime a version with an export is served by: STL_RUNTIME, or for `auto` torch on a GPU and
    OpenVINO (else ONNX Runtime, else torch: whatever is installed) on a CPU."""
    if settings.runtime != "auto":
        return settings.runtime
    if planned_device(settings) == "cuda":
        # ONNX Runtime's CUDA provider would also run it, unmeasured here: torch is the measured GPU path.
        return "torch" if installed("torch") else "onnxruntime"
    for name in ("openvino", "onnxruntime"):
        if installed(name):
            return name
    return "torch"


@dataclass(frozen=True)
class SceneEncoder:
    """A scene upload -> the [3, S, S] crop every runtime takes -> unit vectors, for one loaded version."""

    runtime: Runtime
    preprocess: Preprocess
    description: str  # what /readyz and the start-up log say: "openvino (fp32)", "torch (no export ...)"

    @property
    def name(self) -> str:
        return self.runtime.name

    def crop(self, image: bytes, bbox: BBox | None, max_pixels: int) -> np.ndarray:
        """Decode (the index build's decoder, JPEG draft included) and crop: float32 [3, S, S]."""
        picture = decode_image(image, max_pixels, lambda raw: load_image_for(raw, bbox, self.preprocess))
        return to_array(picture, bbox, self.preprocess)

    def crop_of(self, image: bytes, picture: Image.Image, bbox: BBox | None, max_pixels: int) -> np.ndarray:
        """One item's crop of a photo already decoded into `picture` (several items of one photo: /shop).
        Without JPEG draft decoding it is cut from that decode; with it the crop decodes at its own scale, as
        the index build did (the pixels must be the same)."""
        if self.preprocess.jpeg_draft:
            return self.crop(image, bbox, max_pixels)
        return to_array(picture, bbox, self.preprocess)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] crops -> [B, dim] unit scene vectors."""
        return self.runtime.vectors(crops, "scene")

    def warm_up(self, max_batch: int = 1) -> None:
        """A forward pass at every batch size 1..`max_batch` now: a broken model fails at load time, not on the
        first user, and no user pays a batch size's first pass: OpenVINO prepares each new input shape of a
        dynamic-batch graph on its first pass (lite0 on 2 cores: 38 ms for the first batch of 4, 17 after)."""
        size = self.preprocess.image_size
        for batch in range(1, max(1, max_batch) + 1):
            self.embed(np.zeros((batch, 3, size, size), dtype=np.float32))


def runtime_threads(settings: Settings) -> int:
    """STL_RUNTIME_THREADS, or every core: one OpenVINO pass over all of them (two one-threaded passes side
    by side need streams, and those gave the service nothing more: see service/batching.py)."""
    return settings.runtime_threads or os.cpu_count() or 1


def load_encoder(settings: Settings, artifact: Artifact) -> SceneEncoder:
    """The version's encoder, checked against the embedder its indexes were built with.

    RuntimeUnavailable (the runtime, its package or the precision is not here) and the artifact's mismatch
    errors propagate: the caller degrades the version to popularity.
    """
    precision = check_precision(runtime_precision(settings.precision))
    name = planned_runtime(settings)
    export_dir = artifact.export_dir
    reason = None
    if settings.checkpoint is not None:
        reason = "STL_CHECKPOINT overrides the version's model"
    elif export_dir is None:
        reason = "no export in this version"
    if name == "torch" or reason is not None:
        runtime = _torch_runtime(settings, artifact)  # f32: torch runs nothing else on a CPU
        description = f"torch ({reason})" if reason is not None else "torch (fp32)"
        if reason is not None and name != "torch":
            LOG.warning("version %s is served by torch, not %s: %s", artifact.version, name, reason)
    else:
        device = planned_device(settings) if name == "onnxruntime" else "cpu"
        runtime = load_runtime(name, export_dir, precision, runtime_threads(settings), device)  # type: ignore[arg-type]
        description = f"{name} ({settings.precision})"
    artifact.check_embedder(runtime.fingerprint)
    return SceneEncoder(runtime, Preprocess.from_dict(runtime.fingerprint["preprocess"]), description)


def _torch_runtime(settings: Settings, artifact: Artifact) -> Runtime:
    if not installed("torch"):
        raise RuntimeUnavailable(
            f"index version {artifact.version} needs torch (it has no exported model, or STL_CHECKPOINT is set) "
            "and torch is not installed here: rebuild the version with an export, or install the train extra")
    # Imported here, not at module level: the torch runtime is the one path of this service that needs
    # torch and timm, and a process serving an export must never load them (issue 14).
    from training.model.checkpoint import load_embedder

    embedder = load_embedder(settings.checkpoint or artifact.checkpoint_path, settings.device,
                             settings.backbone_weights)
    return load_runtime("torch", embedder=embedder)


def check_precision_available(settings: Settings) -> None:
    """Refuse STL_PRECISION=bf16 at start where it cannot run (RuntimeUnavailable), rather than degrade."""
    if settings.precision == "fp32":
        return
    name = planned_runtime(settings)
    if name != "openvino":
        raise RuntimeUnavailable(f"STL_PRECISION=bf16 runs on OpenVINO only; the runtime here is {name}: "
                                 "set STL_RUNTIME=openvino (or auto on a CPU), or STL_PRECISION=fp32")
    if not cpu_supports_bf16():
        raise RuntimeUnavailable("STL_PRECISION=bf16 needs a CPU with AVX-512 BF16 or AMX (OpenVINO reports "
                                 "none here): use STL_PRECISION=fp32")
