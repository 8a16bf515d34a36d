"""The item detector: the frozen backbone's multi-scale feature maps -> FPN -> torchvision's FCOS head.

Shop the whole look without drawing a box: `Detector.detect(images)` returns, per image, the items it finds
(normalised `[left, top, right, bottom]` box, full category path, score), best first. Only the FPN and the
FCOS head train; the backbone is the same frozen ImageNet model the embedder uses, so its pyramid can be
cached once per (backbone, preprocessing) (`training.fit.detector`).

A whole scene is resized to a square `image_size` (the embedder's own `to_tensor` with no bbox), so a
normalised box on the network's input is the same normalised box on the original photo.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

from training.errors import DataError, ModelMismatch, one_line
from training.io import atomic_path, file_sha256
from training.model.backbones import Backbone, load_backbone
from training.model.detect_post import (
    CHECKPOINT_FILE,
    GRAPH_FILE,
    INPUT_NAME,
    OUTPUT_NAMES,
    Detection,
    DetectorExport,
    DetectorExportError,
    DetectorGraph,
    Level,
)
from training.model.device import resolve_device
from training.model.embedder import freeze_for_cpu
from training.model.preprocess import Preprocess, to_tensor

try:
    import onnx
except ImportError:  # optional: without it a detector cannot be exported (an index build says so)
    onnx = None

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
# benchmarks/bench_detector.py on the default synthetic catalogue, 6 epochs at each size, test split: mAP@0.5
# 0.941 / 0.964 / 0.974 and earrings' AP@0.5 0.61 / 0.78 / 0.89 at 320 / 416 / 512 px, for 1 / 1.52 / 2.08x the
# time of the served graph (OpenVINO bf16: 7.5 / 11.4 / 15.6 ms a photo with pre- and post-processing, in one
# run). 320 px already passes the targets (12 epochs: mAP@0.5 0.946, end-to-end HR@10 ratio 0.978), and /shop's
# latency (issue 16: <= 3x /recommend, measured 3.0-3.4x at 320 px on a quiet machine) has no room for 4 more
# ms; 416 px (`--image-size 416`) is the choice where earrings matter more than /shop's latency.
DEFAULT_IMAGE_SIZE = 320
# A square input past this is no photo size a detector needs, and its feature pyramid alone would not fit in
# memory (100,000 px asked torch for 240 GB).
MAX_IMAGE_SIZE = 2048
GROUP_NORM_GROUPS = 32  # torchvision's FCOSHead: GroupNorm(32, fpn_channels) after each tower conv


class DetectorMismatch(ModelMismatch):
    """A detector checkpoint does not fit the backbone found here, or is not a detector checkpoint."""


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's architecture; saved in its checkpoint and read back through `from_dict`."""

    image_size: int = DEFAULT_IMAGE_SIZE
    # FPN and head width. 32 (320 px, 12 epochs) lost 0.04 test mAP@0.5:0.95 and 0.06 earrings AP@0.5 to 64 and
    # saved only 8% of the served graph's time in bf16 (18% in f32): 64 stays.
    fpn_channels: int = 64
    head_convs: int = 2  # conv layers in each FCOS tower (torchvision's default is 4)
    center_sampling_radius: float = 1.5

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= MAX_IMAGE_SIZE:
            raise DataError(f"image_size must be between 32 and {MAX_IMAGE_SIZE}, got {self.image_size}")
        # torchvision's FCOS towers use GroupNorm(32, channels): 48 would pass a "multiple of 16" rule and then
        # fail deep inside torchvision.
        if self.fpn_channels < GROUP_NORM_GROUPS or self.fpn_channels % GROUP_NORM_GROUPS:
            raise DataError(f"fpn_channels must be a positive multiple of {GROUP_NORM_GROUPS} (the FCOS head's "
                            f"GroupNorm groups), got {self.fpn_channels}")
        if self.head_convs < 0:
            raise DataError(f"head_convs must be >= 0, got {self.head_convs}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> DetectorConfig:
        return cls(**raw)


# ---------------------------------------------------------------- the backbone's pyramid

@dataclass(frozen=True)
class PyramidSpec:
    strides: tuple[int, ...]
    channels: tuple[int, ...]


class _Lite0Pyramid(nn.Module):
    """EfficientNet-Lite0 (timm) up to its last stage, returning stages 3, 5 and 7 (strides 8, 16, 32)."""

    TAPS = (2, 4, 6)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = model.conv_stem, model.bn1, model.blocks

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.bn1(self.conv_stem(images))
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.TAPS:
                outputs.append(x)
        return tuple(outputs)


class _ResNetPyramid(nn.Module):
    """torchvision ResNet-50 layers 2-4 (strides 8, 16, 32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
        self.layer2, self.layer3, self.layer4 = model.layer2, model.layer3, model.layer4

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c3 = self.layer2(self.stem(images))
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)


class _TinyPyramid(nn.Module):
    """The test backbone's two conv layers (strides 2 and 4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.first, self.second = model.layers[0:2], model.layers[2:4]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c1 = self.first(images)
        return c1, self.second(c1)


_PYRAMIDS: dict[str, tuple[type[nn.Module], PyramidSpec]] = {
    "efficientnet_lite0": (_Lite0Pyramid, PyramidSpec((8, 16, 32), (40, 112, 320))),
    "resnet50": (_ResNetPyramid, PyramidSpec((8, 16, 32), (512, 1024, 2048))),
    "tiny": (_TinyPyramid, PyramidSpec((2, 4), (16, 32))),
}


def pyramid_spec(backbone_name: str) -> PyramidSpec:
    if backbone_name not in _PYRAMIDS:
        raise DataError(f"backbone {backbone_name!r} has no feature pyramid for detection; "
                        f"supported: {sorted(_PYRAMIDS)}")
    return _PYRAMIDS[backbone_name][1]


def build_pyramid(backbone: Backbone) -> nn.Module:
    """The frozen backbone's own modules (same weights, nothing re-loaded) wired to return its pyramid."""
    pyramid_spec(backbone.name)
    module = _PYRAMIDS[backbone.name][0](backbone.model).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# The whole-photo resize of detectors trained from now on: `Preprocess.reducing_gap`. Detectors trained before
# it keep the plain resize their checkpoint records, and are served with it.
DETECT_REDUCING_GAP = 2.0


def detection_preprocess(backbone: Backbone, image_size: int,
                         reducing_gap: float | None = DETECT_REDUCING_GAP) -> Preprocess:
    """Whole-scene preprocessing: the backbone's normalisation at the detector's resolution, no crop."""
    return Preprocess(image_size, backbone.mean, backbone.std, context=0.0, reducing_gap=reducing_gap)


# ---------------------------------------------------------------- FPN + FCOS head

class _Neck(nn.Module):
    """FPN over the cached pyramid; `out_channels` is what torchvision's FCOS asks of a backbone."""

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels)
        self.out_channels = out_channels

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.fpn(OrderedDict((str(i), level) for i, level in enumerate(maps))).values())


class DetectorNet(nn.Module):
    """The trainable part: FPN + FCOS head, on pyramid maps (from the backbone or the feature cache).

    torchvision's `FCOS` holds the head, the point generator, the target assignment (centre sampling, scale
    ranges per level), the losses (focal, GIoU, centre-ness) and the post-processing (top-k, NMS); this
    class calls those pieces on feature maps instead of images, since the backbone is not part of it.
    """

    def __init__(self, spec: PyramidSpec, num_classes: int, config: DetectorConfig) -> None:
        super().__init__()
        if num_classes < 1:
            raise DataError("a detector needs at least one category")
        self.spec, self.config = spec, config
        sizes = tuple((stride,) for stride in spec.strides)  # FCOS: one point per location, size = stride
        anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        neck = _Neck(spec.channels, config.fpn_channels)
        head = FCOSHead(config.fpn_channels, 1, num_classes, num_convs=config.head_convs)
        self.fcos = FCOS(neck, num_classes, anchor_generator=anchors, head=head,
                         center_sampling_radius=config.center_sampling_radius)
        self._postprocess_lock = threading.Lock()

    def _heads(self, maps: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list]:
        features = self.fcos.backbone(maps)
        outputs = self.fcos.head(features)
        size = self.config.image_size
        # The point generator reads only the batch's shape: an expanded scalar costs no memory.
        images = ImageList(features[0].new_zeros(()).expand(len(features[0]), 3, size, size),
                           [(size, size)] * len(features[0]))
        return outputs, features, self.fcos.anchor_generator(images, features)

    def loss(self, maps: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FCOS losses; targets hold `boxes` (pixels of the square input, xyxy) and `labels` (category index)."""
        outputs, features, anchors = self._heads(maps)
        per_level = [level.shape[2] * level.shape[3] for level in features]
        return self.fcos.compute_loss(targets, outputs, anchors, per_level)

    def predict(self, maps: Sequence[torch.Tensor], score_threshold: float, nms_threshold: float,
                max_detections: int) -> list[dict[str, torch.Tensor]]:
        """Boxes (input pixels), scores and labels per image after FCOS's top-k and class-wise NMS."""
        outputs, features, anchors = self._heads(maps)
        per_level = [level.shape[2] * level.shape[3] for level in features]
        split = {key: list(value.split(per_level, dim=1)) for key, value in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        size = self.config.image_size
        with self._postprocess_lock:  # FCOS reads its thresholds from attributes
            self.fcos.score_thresh, self.fcos.nms_thresh = score_threshold, nms_threshold
            self.fcos.detections_per_img = max_detections
            return self.fcos.postprocess_detections(split, split_anchors, [(size, size)] * len(features[0]))


@torch.inference_mode()
def detect_on_maps(net: DetectorNet, maps: Sequence[torch.Tensor], categories: Sequence[str],
                   score_threshold: float = 0.3, nms_threshold: float = 0.6,
                   max_detections: int = 20) -> list[list[Detection]]:
    """Per image, its `Detection`s sorted by score (highest first); the net runs in eval mode and is given
    back in the mode it was in (a trainer validating mid-epoch)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        raw = net.predict([level.to(device, torch.float32) for level in maps], score_threshold, nms_threshold,
                          max_detections)
    finally:
        net.train(was_training)
    size = float(net.config.image_size)
    results = []
    for image in raw:
        boxes = (image["boxes"].float().cpu() / size).clamp_(0.0, 1.0).tolist()
        scores, labels = image["scores"].float().cpu(), image["labels"].cpu().tolist()
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        results.append([Detection(tuple(boxes[i]), categories[labels[i]], float(scores[i])) for i in order])
    return results


# ---------------------------------------------------------------- inference wrapper and checkpoint

@dataclass
class DetectorCheckpoint:
    config: DetectorConfig
    categories: list[str]  # label index -> full category path
    state_dict: dict[str, torch.Tensor]
    backbone_name: str
    backbone_weights_sha256: str
    preprocess: Preprocess
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    sha256: str | None = None


def save_detector(path: str | Path, checkpoint: DetectorCheckpoint) -> str:
    """Write atomically (temp file + rename); return the file's sha256."""
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": "detector",
        "config": checkpoint.config.to_dict(),
        "categories": list(checkpoint.categories),
        "state_dict": {key: value.detach().cpu() for key, value in checkpoint.state_dict.items()},
        "backbone": {"name": checkpoint.backbone_name, "weights_sha256": checkpoint.backbone_weights_sha256},
        "preprocess": checkpoint.preprocess.to_dict(),
        "train_config": checkpoint.train_config,
        "metrics": checkpoint.metrics,
        "data_fingerprint": checkpoint.data_fingerprint,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return file_sha256(path)


def read_detector_checkpoint(path: str | Path) -> DetectorCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"detector checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise DetectorMismatch(f"{path} is not a readable detector checkpoint ({one_line(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("kind") != "detector" \
            or payload.get("format_version") != FORMAT_VERSION:
        raise DetectorMismatch(f"{path} is not a detector checkpoint of format {FORMAT_VERSION}")
    try:
        return DetectorCheckpoint(
            config=DetectorConfig.from_dict(payload["config"]),
            categories=list(payload["categories"]),
            state_dict=payload["state_dict"],
            backbone_name=payload["backbone"]["name"],
            backbone_weights_sha256=payload["backbone"]["weights_sha256"],
            preprocess=Preprocess.from_dict(payload["preprocess"]),
            train_config=payload.get("train_config", {}),
            metrics=payload.get("metrics", {}),
            data_fingerprint=payload.get("data_fingerprint", ""),
            sha256=file_sha256(path),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DetectorMismatch(f"{path} is an incomplete detector checkpoint: {exc!r}") from exc


class Detector:
    """Frozen backbone pyramid + trained FPN/FCOS head on one device: PIL images in, `Detection`s out."""

    def __init__(self, backbone: Backbone, net: DetectorNet, categories: Sequence[str],
                 device: str | torch.device = "auto", freeze: bool = True,
                 reducing_gap: float | None = DETECT_REDUCING_GAP) -> None:
        if len(categories) != net.fcos.head.classification_head.num_classes:
            raise DetectorMismatch(f"{len(categories)} categories for a head of "
                                   f"{net.fcos.head.classification_head.num_classes} classes")
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.backbone = backbone
        self.config = net.config
        self.categories = list(categories)
        self.preprocess = detection_preprocess(backbone, net.config.image_size, reducing_gap)
        self.pyramid = build_pyramid(backbone).to(self.device)
        if self.device.type == "cpu" and freeze:
            self.pyramid = freeze_for_cpu(self.pyramid, net.config.image_size, torch.contiguous_format)
        self.net = net.to(self.device).eval()

    def transform(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, None, self.preprocess)

    @torch.inference_mode()
    def pyramid_maps(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's pyramid (float32, on the CPU) of a batch from `transform`."""
        maps = self.pyramid(batch.to(self.device))
        return [level.float().cpu() for level in maps]

    def detect_maps(self, maps: Sequence[torch.Tensor], score_threshold: float = 0.3, nms_threshold: float = 0.6,
                    max_detections: int = 20) -> list[list[Detection]]:
        """Detections from pyramid maps (what training's validation runs on cached maps)."""
        return detect_on_maps(self.net, maps, self.categories, score_threshold, nms_threshold, max_detections)

    def detect(self, images: Sequence[Image.Image], score_threshold: float = 0.3, nms_threshold: float = 0.6,
               max_detections: int = 20) -> list[list[Detection]]:
        """Per image, its detections sorted by score (highest first)."""
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return self.detect_maps(self.pyramid_maps(batch), score_threshold, nms_threshold, max_detections)


def load_detector(path: str | Path, device: str | torch.device = "auto",
                  backbone_weights: str | Path | None = None, freeze: bool = True) -> Detector:
    """The detector a checkpoint describes, on its backbone (checked against the weights found here)."""
    checkpoint = read_detector_checkpoint(path)
    backbone = load_backbone(checkpoint.backbone_name, backbone_weights)
    if backbone.weights_sha256 != checkpoint.backbone_weights_sha256:
        raise DetectorMismatch(f"detector {path} was trained on other {backbone.name} weights "
                               f"({checkpoint.backbone_weights_sha256[:12]} vs {backbone.weights_sha256[:12]})")
    net = DetectorNet(pyramid_spec(backbone.name), len(checkpoint.categories), checkpoint.config)
    net.load_state_dict(checkpoint.state_dict)
    detector = Detector(backbone, net, checkpoint.categories, device, freeze=freeze,
                        reducing_gap=checkpoint.preprocess.reducing_gap)  # resized as it was trained
    if detector.preprocess != checkpoint.preprocess:
        raise DetectorMismatch(f"detector {path} was trained with preprocessing {checkpoint.preprocess.to_dict()}, "
                               f"but {backbone.name} preprocesses as {detector.preprocess.to_dict()}")
    return detector


# ---------------------------------------------------------------- export for a torch-free server

EXPORT_OPSET = 17
# Raw outputs (logits, ltrb codes) of fp32 ONNX vs torch differ by float rounding only; more is a broken export.
MAX_EXPORT_DIFF = 1e-3


class _RawDetector(nn.Module):
    """Image batch -> the FCOS head's raw outputs over every point: what `detect_post.decode` takes."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        # CPU copies of the eager modules: the live pyramid may be frozen TorchScript, on a GPU.
        self.pyramid = build_pyramid(detector.backbone).cpu()
        self.neck = copy.deepcopy(detector.net.fcos.backbone).cpu()
        self.head = copy.deepcopy(detector.net.fcos.head).cpu()
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.head(self.neck(list(self.pyramid(images))))
        return outputs["cls_logits"], outputs["bbox_regression"], outputs["bbox_ctrness"]


def _levels(detector: Detector) -> list[Level]:
    size = detector.config.image_size
    with torch.inference_mode():
        maps = build_pyramid(detector.backbone)(torch.zeros(1, 3, size, size))
    strides = detector.net.spec.strides
    return [Level(int(m.shape[2]), int(m.shape[3]), size // int(m.shape[2]), int(stride))
            for m, stride in zip(maps, strides, strict=True)]


def export_detector(detector: Detector, checkpoint: str | Path, out_dir: str | Path) -> DetectorExport:
    """Copy `checkpoint` (the detector's own file) into `out_dir` beside its ONNX graph and `detector.json`.

    The graph runs the pyramid, FPN and head for the fixed square input (dynamic batch); DetectorExportError
    without the onnx package."""
    if onnx is None:
        raise DetectorExportError("exporting the detector needs the onnx package (pip install onnx)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if Path(checkpoint).resolve() != (out_dir / CHECKPOINT_FILE).resolve():
        shutil.copyfile(checkpoint, out_dir / CHECKPOINT_FILE)
    size = detector.config.image_size
    module = _RawDetector(detector)
    graph = out_dir / GRAPH_FILE
    with atomic_path(graph) as temp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 3, size, size),), str(temp), dynamo=False,
                          opset_version=EXPORT_OPSET, do_constant_folding=True, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
        onnx.checker.check_model(str(temp), full_check=True)
    checkpoint_data = read_detector_checkpoint(out_dir / CHECKPOINT_FILE)
    export = DetectorExport(
        image_size=size, preprocess=detector.preprocess.to_dict(), categories=list(detector.categories),
        levels=_levels(detector), graph_file=GRAPH_FILE, graph_sha256=file_sha256(graph),
        checkpoint_sha256=checkpoint_data.sha256 or "", backbone=detector.backbone.name,
        backbone_weights_sha256=detector.backbone.weights_sha256,
        exporter=f"torch {torch.__version__} torchscript-onnx")
    export.write(out_dir)
    return export


def check_detector_export(detector: Detector, out_dir: str | Path, runtime: str = "auto", batch: int = 2,
                          seed: int = 0, max_diff: float = MAX_EXPORT_DIFF) -> float:
    """Largest absolute difference between torch's and the runtime's raw outputs on a seeded batch, recorded in
    `detector.json`; DetectorExportError when over `max_diff` (relative to the outputs' scale)."""
    size = detector.config.image_size
    inputs = np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = [t.numpy() for t in _RawDetector(detector)(torch.from_numpy(inputs))]
    graph = DetectorGraph(out_dir, runtime, precision="f32")  # torch's precision: the check is of the export
    got = graph.raw(inputs)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(expected, got, strict=True))
    scale = max(1.0, max(float(np.max(np.abs(a))) for a in expected))
    if diff > max_diff * scale:
        raise DetectorExportError(f"the exported detector's outputs differ from torch's by {diff:.3g} in "
                                  f"{graph.name} (allowed {max_diff * scale:.3g})")
    export = DetectorExport.read(out_dir)
    updated = DetectorExport(**{**export.__dict__, "max_abs_diff": diff})
    updated.write(out_dir)
    LOG.info("detector export checked in %s: max |torch - export| = %.3g", graph.name, diff)
    return diff
