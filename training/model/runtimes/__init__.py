"""Runtimes that run the embedder's two stages on numpy arrays: torch (the reference), ONNX Runtime, OpenVINO.

Each exported-graph runtime module imports only numpy and its own runtime package, so a serving process
that loads one needs no torch. `load_runtime` imports the chosen module only.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from training.errors import DataError
from training.model.runtimes.base import (
    ExportManifest,
    ExportMismatch,
    Precision,
    Runtime,
    RuntimeUnavailable,
)

if TYPE_CHECKING:
    from training.model.embedder import Embedder

RuntimeName = Literal["auto", "openvino", "onnxruntime", "torch"]
RUNTIMES: tuple[str, ...] = ("openvino", "onnxruntime", "torch")
# runtime name -> (module, class, the package it needs)
_MODULES = {
    "openvino": ("training.model.runtimes.openvino_runtime", "OpenVinoRuntime", "openvino"),
    "onnxruntime": ("training.model.runtimes.onnx_runtime", "OnnxRuntime", "onnxruntime"),
    "torch": ("training.model.runtimes.torch_runtime", "TorchRuntime", "torch"),
}

__all__ = ["ExportManifest", "ExportMismatch", "Runtime", "RuntimeUnavailable", "installed", "load_runtime",
           "resolve_name"]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def installed(name: str) -> bool:
    """Whether the package runtime `name` needs is installed (without importing it)."""
    return name in _MODULES and _installed(_MODULES[name][2])


def resolve_name(name: RuntimeName, device: str = "cpu", embedder: Embedder | None = None) -> str:
    """`auto`: OpenVINO on a CPU (the fastest there), ONNX Runtime on CUDA or without OpenVINO, else torch."""
    if name != "auto":
        if name not in _MODULES:
            raise DataError(f"unknown runtime {name!r}; use auto or one of {list(RUNTIMES)}")
        return name
    candidates = ["onnxruntime"] if device == "cuda" else ["openvino", "onnxruntime"]
    for candidate in candidates:
        if _installed(_MODULES[candidate][2]):
            return candidate
    if embedder is not None:
        return "torch"
    raise RuntimeUnavailable(f"no runtime for device {device!r}: install openvino or onnxruntime")


def load_runtime(
    name: RuntimeName = "auto",
    export_dir: str | Path | None = None,
    precision: Precision = "f32",
    threads: int | None = None,
    device: str = "cpu",
    embedder: Embedder | None = None,
) -> Runtime:
    """A runtime over an export folder (`export_embedder`'s output), or over `embedder` for `torch`."""
    resolved = resolve_name(name, device, embedder)
    module_name, class_name, package = _MODULES[resolved]
    if not _installed(package):
        raise RuntimeUnavailable(f"runtime {resolved} needs the {package} package, which is not installed")
    runtime_class = getattr(importlib.import_module(module_name), class_name)
    if resolved == "torch":
        if embedder is None:
            raise DataError("the torch runtime runs an Embedder: pass embedder=")
        return runtime_class(embedder, precision=precision, threads=threads)
    if export_dir is None:
        raise DataError(f"the {resolved} runtime runs an exported model: pass export_dir=")
    return runtime_class(export_dir, precision=precision, threads=threads, device=device)
