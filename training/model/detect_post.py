"""The item detector without torch: its exported graph (ONNX) in OpenVINO or ONNX Runtime, and FCOS's
post-processing in numpy.

`training.model.detector.export_detector` writes one graph, the frozen backbone's pyramid + FPN + FCOS head
for a fixed square input, whose outputs are the head's raw tensors over every point of every level:
`cls_logits` [B, N, C], `bbox_regression` [B, N, 4] (ltrb distances in units of the level's stride) and
`bbox_ctrness` [B, N, 1]. `decode` does what torchvision's `FCOS.postprocess_detections` does with them:
score = sqrt(sigmoid(cls) * sigmoid(ctr)), threshold, top-k per level, boxes = point -/+ ltrb * stride,
clipped to the input, class-wise NMS, the best `max_detections`. Tests hold it to `Detector.detect`.

`detector.json` beside the graph (`DetectorExport`) names the graph's checksum, the input size and
preprocessing, the levels' grids and the categories: a server needs nothing else.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.stl import BBox
from training.errors import DataError
from training.io import file_sha256, write_json_atomic
from training.model.arrays import Preprocess, to_array
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

try:  # optional: a server installs the runtime it uses
    import openvino as ov
except ImportError:
    ov = None
try:
    import onnxruntime as ort
except ImportError:
    ort = None

LOG = logging.getLogger(__name__)

EXPORT_FORMAT = 1
EXPORT_MANIFEST_FILE = "detector.json"
GRAPH_FILE = "detector.onnx"
CHECKPOINT_FILE = "detector.pt"
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls_logits", "bbox_regression", "bbox_ctrness")
TOPK_CANDIDATES = 1000  # torchvision FCOS's default, per level


class DetectorExportError(DataError):
    """A detector export folder is incomplete, corrupt, or cannot be run here."""


@dataclass(frozen=True)
class Detection:
    bbox: BBox  # normalised [left, top, right, bottom]
    category: str  # full category path
    score: float


@dataclass(frozen=True)
class Level:
    """One pyramid level's grid of points: `height` x `width` points `stride` pixels apart, each of `size`."""

    height: int
    width: int
    stride: int
    size: int  # the point's anchor size (torchvision's AnchorGenerator size: the level's nominal stride)


@dataclass(frozen=True)
class DetectorExport:
    """The contract of a detector export folder (`detector.json`), written by `export_detector`."""

    image_size: int
    preprocess: dict[str, Any]
    categories: list[str]
    levels: list[Level]
    graph_file: str
    graph_sha256: str
    checkpoint_sha256: str  # the detector.pt the graph was exported from
    backbone: str
    backbone_weights_sha256: str
    max_abs_diff: float | None = None  # largest raw-output difference to torch on the export check
    exporter: str = ""
    format_version: int = EXPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "levels": [asdict(level) for level in self.levels]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DetectorExport:
        try:
            export = cls(
                image_size=int(raw["image_size"]), preprocess=dict(raw["preprocess"]),
                categories=[str(c) for c in raw["categories"]],
                levels=[Level(int(v["height"]), int(v["width"]), int(v["stride"]), int(v["size"]))
                        for v in raw["levels"]],
                graph_file=str(raw["graph_file"]), graph_sha256=str(raw["graph_sha256"]),
                checkpoint_sha256=str(raw["checkpoint_sha256"]), backbone=str(raw["backbone"]),
                backbone_weights_sha256=str(raw["backbone_weights_sha256"]),
                max_abs_diff=None if raw.get("max_abs_diff") is None else float(raw["max_abs_diff"]),
                exporter=str(raw.get("exporter", "")), format_version=int(raw.get("format_version", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DetectorExportError(f"not a detector export manifest ({type(exc).__name__}: {exc})") from exc
        if export.format_version != EXPORT_FORMAT:
            raise DetectorExportError(f"detector export format {export.format_version} is not {EXPORT_FORMAT}")
        if not export.categories or not export.levels:
            raise DetectorExportError("a detector export names no categories or no levels")
        return export

    @classmethod
    def read(cls, folder: str | Path) -> DetectorExport:
        path = Path(folder) / EXPORT_MANIFEST_FILE
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise DetectorExportError(f"{path} is unreadable: {exc}") from exc

    def write(self, folder: str | Path) -> None:
        write_json_atomic(Path(folder) / EXPORT_MANIFEST_FILE, self.to_dict())

    def verify(self, folder: str | Path) -> None:
        """DetectorExportError when the graph is missing or is not the one exported."""
        graph = Path(folder) / self.graph_file
        if not graph.is_file():
            raise DetectorExportError(f"{graph} is missing")
        if file_sha256(graph) != self.graph_sha256:
            raise DetectorExportError(f"{graph}: sha256 differs from {EXPORT_MANIFEST_FILE}'s")

    @property
    def points(self) -> int:
        return sum(level.height * level.width for level in self.levels)

    def preprocessing(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)


# ---------------------------------------------------------------- FCOS decoding in numpy

def level_anchors(level: Level) -> np.ndarray:
    """[H * W, 4] anchors of one level, as torchvision's AnchorGenerator makes them (row-major, rounded)."""
    half = np.round(np.array([-level.size, -level.size, level.size, level.size], dtype=np.float32) / 2)
    ys, xs = np.meshgrid(np.arange(level.height, dtype=np.float32) * level.stride,
                         np.arange(level.width, dtype=np.float32) * level.stride, indexing="ij")
    shifts = np.stack([xs.ravel(), ys.ravel(), xs.ravel(), ys.ravel()], axis=1)
    return (shifts + half[None, :]).astype(np.float32)


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-values.astype(np.float32)))).astype(np.float32)


def box_iou(boxes: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[N, M] IoU of xyxy boxes."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_other = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
    left_top = np.maximum(boxes[:, None, :2], other[None, :, :2])
    right_bottom = np.minimum(boxes[:, None, 2:], other[None, :, 2:])
    wh = np.clip(right_bottom - left_top, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / np.maximum(area[:, None] + area_other[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by greedy NMS (torchvision's rule: drop IoU > threshold), best score first."""
    return batched_nms(boxes, scores, np.zeros(len(scores), dtype=np.int64), threshold)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Class-wise greedy NMS; the kept indices sorted by score, highest first, at most `max_keep` of them.

    One pass over every class at once, in score order: whether a box survives depends only on the boxes of
    its class that score higher, so this keeps what NMS class by class would, and it can stop once
    `max_keep` are kept. Each kept box costs one vectorised IoU against the later boxes of its class (the
    evaluation's 0.05 score threshold leaves thousands of candidates: ~97 ms a photo class by class in a
    Python loop before, a few ms now).
    """
    order = np.argsort(-scores, kind="stable")
    boxes, labels = boxes[order], labels[order]
    alive = np.ones(len(order), dtype=bool)
    keep: list[int] = []
    position = 0
    while max_keep is None or len(keep) < max_keep:
        ahead = np.flatnonzero(alive[position:])
        if not ahead.size:
            break
        position += int(ahead[0])
        keep.append(position)
        later = np.flatnonzero(alive[position + 1:]) + position + 1
        rivals = later[labels[later] == labels[position]]
        if rivals.size:
            alive[rivals[box_iou(boxes[position:position + 1], boxes[rivals])[0] > threshold]] = False
        position += 1
    return order[np.asarray(keep, dtype=np.int64)]


def decode(cls_logits: np.ndarray, bbox_regression: np.ndarray, bbox_ctrness: np.ndarray, export: DetectorExport,
           score_threshold: float = 0.3, nms_threshold: float = 0.6, max_detections: int = 20,
           anchors: Sequence[np.ndarray] | None = None) -> list[list[Detection]]:
    """Per image of the batch, its detections sorted by score (normalised boxes, as `Detector.detect`)."""
    anchors = anchors if anchors is not None else [level_anchors(level) for level in export.levels]
    sizes = [len(a) for a in anchors]
    bounds = np.cumsum([0, *sizes])
    size = float(export.image_size)
    results = []
    for image in range(len(cls_logits)):
        boxes_all, scores_all, labels_all = [], [], []
        for index, level_points in enumerate(anchors):
            start, end = bounds[index], bounds[index + 1]
            logits = cls_logits[image, start:end]
            num_classes = logits.shape[-1]
            scores = np.sqrt(_sigmoid(logits) * _sigmoid(bbox_ctrness[image, start:end])).ravel()
            candidates = np.flatnonzero(scores > score_threshold)
            order = np.argsort(-scores[candidates], kind="stable")[:TOPK_CANDIDATES]
            candidates = candidates[order]
            points, labels = candidates // num_classes, candidates % num_classes
            chosen = level_points[points]
            centre_x = 0.5 * (chosen[:, 0] + chosen[:, 2])
            centre_y = 0.5 * (chosen[:, 1] + chosen[:, 3])
            width, height = chosen[:, 2] - chosen[:, 0], chosen[:, 3] - chosen[:, 1]
            codes = bbox_regression[image, start:end][points].astype(np.float32)
            boxes = np.stack([centre_x - codes[:, 0] * width, centre_y - codes[:, 1] * height,
                              centre_x + codes[:, 2] * width, centre_y + codes[:, 3] * height], axis=1)
            boxes_all.append(np.clip(boxes, 0.0, size))
            scores_all.append(scores[candidates])
            labels_all.append(labels)
        boxes = np.concatenate(boxes_all).reshape(-1, 4)
        scores = np.concatenate(scores_all)
        labels = np.concatenate(labels_all)
        keep = batched_nms(boxes, scores, labels, nms_threshold, max_detections)
        normalised = np.clip(boxes[keep] / size, 0.0, 1.0)
        results.append([Detection(tuple(float(v) for v in box), export.categories[int(label)], float(score))
                        for box, label, score in zip(normalised, labels[keep], scores[keep], strict=True)])
    return results


# ---------------------------------------------------------------- the graph in a torch-free runtime

class DetectorGraph:
    """The exported detector in OpenVINO (CPU) or ONNX Runtime: PIL images or [B, 3, S, S] arrays in,
    detections out. Thread-safe (one OpenVINO infer request per calling thread).

    `precision` `auto` runs OpenVINO in bf16 where the CPU has it natively (AVX-512 BF16 / AMX) and f32
    elsewhere. Unlike the embedder, whose vectors must match an index built in f32, the detector's boxes are
    compared with nothing stored. On our AMX CPUs bf16 runs the 320 px graph in about half f32's time with the
    same test mAP@0.5 (0.947 vs 0.946; benchmarks/bench_detector.py evaluates this graph in both precisions).
    ONNX Runtime always runs f32.

    OpenVINO runs one photo (what /detect and /shop send) through a copy of the graph compiled for a static
    batch of one (~10% faster than the dynamic-batch graph, measured once on a busy machine); the dynamic one
    is compiled only when a batch of several arrives.
    """

    def __init__(self, folder: str | Path, runtime: str = "auto", threads: int | None = None,
                 verify: bool = True, precision: str = "auto") -> None:
        folder = Path(folder)
        self.export = DetectorExport.read(folder)
        if verify:
            self.export.verify(folder)
        self.preprocess = self.export.preprocessing()
        self.categories = list(self.export.categories)
        self._anchors = [level_anchors(level) for level in self.export.levels]
        self.name = _runtime_name(runtime)
        self._core = ov.Core() if self.name == "openvino" else None
        self.precision = _precision(self.name, precision, self._core)
        self._graph = folder / self.export.graph_file
        self._local = threading.local()
        self._lock = threading.Lock()
        if self.name == "openvino":
            self._config: dict[str, object] = {"INFERENCE_PRECISION_HINT": self.precision,
                                               "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                self._config["INFERENCE_NUM_THREADS"] = int(threads)
            model = self._core.read_model(self._graph)
            size = self.export.image_size
            model.reshape({model.inputs[0].get_any_name(): [1, 3, size, size]})
            self._single = self._core.compile_model(model, "CPU", self._config)
            self._dynamic: Any = None  # compiled on the first batch of several images
        else:
            options = ort.SessionOptions()
            options.inter_op_num_threads = 1
            if threads:
                options.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(str(self._graph), sess_options=options,
                                                 providers=["CPUExecutionProvider"])

    @property
    def image_size(self) -> int:
        return self.export.image_size

    @property
    def description(self) -> str:
        """What a log line says: `openvino (bf16)`."""
        return f"{self.name} ({self.precision})"

    def _request(self, batch: int) -> Any:
        """This thread's infer request for a batch of `batch` (the static graph for one image)."""
        key = "single" if batch == 1 else "dynamic"
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(key)
        if request is None:
            if key == "single":
                compiled = self._single
            else:
                with self._lock:
                    if self._dynamic is None:
                        self._dynamic = self._core.compile_model(self._core.read_model(self._graph), "CPU",
                                                                 self._config)
                compiled = self._dynamic
            request = requests[key] = compiled.create_infer_request()
        return request

    def raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph's (cls_logits, bbox_regression, bbox_ctrness) of a [B, 3, S, S] float32 batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.name == "openvino":
            request = self._request(len(batch))
            request.infer({0: batch})
            outputs = [request.get_output_tensor(i).data.copy() for i in range(len(OUTPUT_NAMES))]
        else:
            outputs = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return outputs[0], outputs[1], outputs[2]

    def to_array(self, image: Image.Image) -> np.ndarray:
        """The whole scene resized to the detector's square input, normalised: [3, S, S] float32."""
        return to_array(image, None, self.preprocess)

    def detect_arrays(self, batch: np.ndarray, score_threshold: float = 0.3, nms_threshold: float = 0.6,
                      max_detections: int = 20) -> list[list[Detection]]:
        cls_logits, bbox_regression, bbox_ctrness = self.raw(batch)
        return decode(cls_logits, bbox_regression, bbox_ctrness, self.export, score_threshold, nms_threshold,
                      max_detections, self._anchors)

    def detect(self, images: Sequence[Image.Image], score_threshold: float = 0.3, nms_threshold: float = 0.6,
               max_detections: int = 20) -> list[list[Detection]]:
        """Per image, its detections sorted by score (highest first): what `Detector.detect` answers."""
        if not images:
            return []
        batch = np.stack([self.to_array(image) for image in images])
        return self.detect_arrays(batch, score_threshold, nms_threshold, max_detections)

    def warm_up(self) -> None:
        size = self.export.image_size
        self.raw(np.zeros((1, 3, size, size), dtype=np.float32))


def _precision(runtime: str, precision: str, core: Any) -> str:
    """`auto`: bf16 in OpenVINO on a CPU that runs it natively, else f32 (ONNX Runtime: always f32)."""
    if precision not in ("auto", "f32", "bf16"):
        raise DetectorExportError(f"the detector runs in precision auto, f32 or bf16, not {precision!r}")
    if runtime != "openvino":
        if precision == "bf16":
            raise DetectorExportError("the detector runs bf16 in openvino only")
        return "f32"
    native = cpu_supports_bf16(core)
    if precision == "bf16" and not native:
        raise DetectorExportError("bf16 needs a CPU with AVX-512 BF16 or AMX; OpenVINO reports none here")
    if precision == "auto":
        return "bf16" if native else "f32"
    return precision


def _runtime_name(runtime: str) -> str:
    """`auto`: OpenVINO where installed (the faster on a CPU), else ONNX Runtime."""
    available = {"openvino": ov is not None, "onnxruntime": ort is not None}
    if runtime == "auto":
        for name, present in available.items():
            if present:
                return name
        raise DetectorExportError("the detector needs openvino or onnxruntime, and neither is installed")
    if runtime not in available:
        raise DetectorExportError(f"the detector runs in openvino or onnxruntime, not {runtime!r}")
    if not available[runtime]:
        raise DetectorExportError(f"{runtime} is not installed")
    return runtime
