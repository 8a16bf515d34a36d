"""Export an `Embedder` to ONNX for the torch-free runtimes, and check an export against torch.

Two graphs per kind: `backbone.onnx` ([B, 3, S, S] -> [B, backbone_dim]) shared by both kinds, and one
head graph per branch ([B, backbone_dim] -> [B, dim], L2-normalised rows), `head.onnx` when the branch is
shared. Keeping the backbone apart mirrors `Embedder.backbone_features` / `project` (feature caches keep
working) and costs nothing measurable: one combined lite0+head graph in OpenVINO f32 (2 threads) ran
12.25 vs 12.24 ms at batch 1 and 181 vs 187 ms at batch 8 on a loaded 2-core box (noise level); the head
is ~0.2 % of the backbone's FLOPs.
`manifest.json`, written last, names the files, their checksums and the fingerprint they were made from.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.data.stl import KINDS
from training.io import atomic_path, file_sha256, write_json_atomic
from training.model.embedder import Embedder
from training.model.runtimes import RuntimeName, installed, load_runtime
from training.model.runtimes.base import (
    FEATURES_NAME,
    INPUT_NAME,
    MANIFEST_FILE,
    VECTORS_NAME,
    ExportManifest,
    ExportMismatch,
    Precision,
    RuntimeUnavailable,
)

try:
    import onnx
except ImportError:  # optional: without it there is no export, and the index build says so and goes on
    onnx = None

LOG = logging.getLogger(__name__)

OPSET = 17
BACKBONE_FILE = "backbone.onnx"
MIN_COSINE = 0.99999  # fp32 exports below this are refused: the index was built with torch's vectors
CHECK_SEED = 0


class _Projection(nn.Module):
    """One head branch + the L2 normalisation `Embedder.project` applies (identity branch without a head)."""

    def __init__(self, branch: nn.Module | None) -> None:
        super().__init__()
        self.branch = branch if branch is not None else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.branch(features), dim=-1)


def can_export() -> bool:
    """Whether the onnx package (which `export_embedder` needs) is installed."""
    return onnx is not None


def _export_graph(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, path: Path) -> None:
    with atomic_path(path) as temp, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter: the dynamo one needs onnxscript and gives the same graph here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(temp), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[input_name], output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        )
        onnx.checker.check_model(str(temp), full_check=True)


def _head_branches(embedder: Embedder) -> dict[str, tuple[str, nn.Module | None]]:
    """kind -> (file name, branch module); both kinds share one file when the head shares its branch."""
    head = embedder.head
    if head is None or head.scene is head.product:
        branch = copy.deepcopy(head.scene).cpu().eval() if head is not None else None
        return {kind: ("head.onnx", branch) for kind in KINDS}
    return {kind: (f"head_{kind}.onnx", copy.deepcopy(getattr(head, kind)).cpu().eval()) for kind in KINDS}


def export_embedder(embedder: Embedder, out_dir: str | Path) -> ExportManifest:
    """Write the backbone and head graphs and their manifest into `out_dir`; return the manifest.

    RuntimeUnavailable when the onnx package is not installed."""
    if onnx is None:
        raise RuntimeUnavailable("exporting needs the onnx package, which is not installed (pip install onnx)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, backbone_dim = embedder.backbone.image_size, embedder.backbone.dim
    # Export from a contiguous CPU copy of the eager backbone: `embedder.model` may be a frozen TorchScript
    # module and the live one may sit on a GPU in channels_last.
    backbone = copy.deepcopy(embedder.backbone.model).to("cpu", memory_format=torch.contiguous_format).eval()
    _export_graph(backbone, torch.zeros(2, 3, size, size), INPUT_NAME, FEATURES_NAME, out_dir / BACKBONE_FILE)
    branches = _head_branches(embedder)
    for name, branch in dict(branches.values()).items():
        _export_graph(_Projection(branch).eval(), torch.zeros(2, backbone_dim), FEATURES_NAME, VECTORS_NAME,
                      out_dir / name)
    files = sorted({BACKBONE_FILE, *(name for name, _ in branches.values())})
    manifest = ExportManifest(
        opset=OPSET,
        image_size=size,
        backbone_dim=backbone_dim,
        dim=embedder.dim,
        backbone_file=BACKBONE_FILE,
        head_files={kind: name for kind, (name, _) in branches.items()},
        sha256={name: file_sha256(out_dir / name) for name in files},
        fingerprint=embedder.fingerprint(),
        exporter=f"torch {torch.__version__} torchscript-onnx",
    )
    write_json_atomic(out_dir / MANIFEST_FILE, manifest.to_dict())
    LOG.info("exported %s (%s) to %s", embedder.backbone.name, ", ".join(files), out_dir)
    return manifest


def check_batch_for(image_size: int, batch: int, seed: int = CHECK_SEED) -> np.ndarray:
    """The fixed seeded input `check_export` compares on: normalised-range noise [B, 3, S, S] float32."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 3, image_size, image_size)).astype(np.float32)


def row_cosines(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(left, axis=1) * np.linalg.norm(right, axis=1)
    return np.sum(left * right, axis=1) / np.maximum(norms, 1e-12)


def check_export(
    embedder: Embedder,
    export_dir: str | Path,
    runtime: RuntimeName = "onnxruntime",
    batch: int = 4,
    precision: Precision = "f32",
    min_cosine: float = MIN_COSINE,
    threads: int | None = None,
) -> float:
    """Smallest cosine between torch's and the runtime's vectors (both kinds) on a seeded batch.

    Raises ExportMismatch when the export was made from another embedder or the cosine is under `min_cosine`.
    """
    loaded = load_runtime(runtime, export_dir, precision=precision, threads=threads)
    if loaded.fingerprint != embedder.fingerprint():
        raise ExportMismatch(
            f"{export_dir} was exported from another model: {loaded.fingerprint} != {embedder.fingerprint()}")
    images = check_batch_for(embedder.backbone.image_size, batch)
    features = embedder.backbone_features(torch.from_numpy(images))
    worst = 1.0
    for kind in KINDS:
        cosines = row_cosines(embedder.project(features, kind), loaded.vectors(images, kind))
        worst = min(worst, float(cosines.min()))
    LOG.info("export check %s/%s batch %d: min cosine %.7f", loaded.name, precision, batch, worst)
    if not worst >= min_cosine:  # also refuses NaN
        raise ExportMismatch(
            f"{loaded.name} ({precision}) vectors differ from torch's: min cosine {worst:.7f} < {min_cosine}")
    return worst


# The runtimes the index build checks an export on: every one a server may load it with.
CHECKED_RUNTIMES: tuple[RuntimeName, ...] = ("onnxruntime", "openvino")


def check_export_runtimes(
    embedder: Embedder,
    export_dir: str | Path,
    runtimes: tuple[RuntimeName, ...] = CHECKED_RUNTIMES,
    min_cosine: float = MIN_COSINE,
) -> dict[str, float]:
    """`check_export` in f32 on each of `runtimes` that is installed: runtime -> smallest cosine to torch.

    Raises ExportMismatch on the first runtime below `min_cosine`, RuntimeUnavailable when none is installed.
    """
    present = [name for name in runtimes if installed(name)]
    if not present:
        raise RuntimeUnavailable(f"no runtime to check the export on: install one of {list(runtimes)}")
    reference = cpu_reference(embedder)
    return {name: check_export(reference, export_dir, name, min_cosine=min_cosine) for name in present}


def cpu_reference(embedder: Embedder) -> Embedder:
    """The embedder itself on a CPU; on a GPU an f32 CPU copy of it (the GPU runs the backbone in f16 autocast,
    which is not the f32 numbers an export is held to). The copy leaves the GPU embedder untouched."""
    if embedder.device.type == "cpu":
        return embedder
    backbone = dataclasses.replace(embedder.backbone, model=copy.deepcopy(embedder.backbone.model).cpu(),
                                   classifier=None)
    head = copy.deepcopy(embedder.head).cpu() if embedder.head is not None else None
    return Embedder(backbone, head, context=embedder.preprocess.context, device="cpu",
                    head_sha256=embedder.head_sha256, jpeg_draft=embedder.preprocess.jpeg_draft)
