"""The one path from an image (and optional bbox) to a vector, shared by training, index build and service.

crop with context -> resize -> normalise -> frozen backbone -> head -> L2 normalise. Anything that
turns an image into a vector goes through `Embedder`, so train and serve cannot drift apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from training.backbones import Backbone, load_backbone
from training.device import resolve_device
from training.head import CompatibilityHead, Kind
from training.stl import BBox

LOG = logging.getLogger(__name__)

METRIC = "inner_product"  # vectors are unit norm, so inner product is cosine similarity
MIN_CROP_PIXELS = 4  # a crop narrower or shorter than this carries no usable signal


class CropTooSmall(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context: float = 0.1  # fraction of the box's width/height added on each side of a scene crop

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocess:
        return cls(int(raw["image_size"]), tuple(raw["mean"]), tuple(raw["std"]), float(raw["context"]))

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def bbox_to_pixels(width: int, height: int, bbox: BBox | None, context: float = 0.0) -> tuple[int, int, int, int]:
    """Pixel box `(x0, y0, x1, y1)` (x1, y1 exclusive) of a normalised bbox grown by `context`, clamped.

    `bbox=None` is the whole image. Raises CropTooSmall when the crop is under MIN_CROP_PIXELS a side.
    """
    if bbox is None:
        return 0, 0, width, height
    left, top, right, bottom = bbox
    pad_x, pad_y = (right - left) * context, (bottom - top) * context
    x0 = max(0, int(np.floor((left - pad_x) * width)))
    y0 = max(0, int(np.floor((top - pad_y) * height)))
    x1 = min(width, int(np.ceil((right + pad_x) * width)))
    y1 = min(height, int(np.ceil((bottom + pad_y) * height)))
    if x1 - x0 < MIN_CROP_PIXELS or y1 - y0 < MIN_CROP_PIXELS:
        raise CropTooSmall(
            f"the crop is {x1 - x0}x{y1 - y0} pixels; at least {MIN_CROP_PIXELS}x{MIN_CROP_PIXELS} is needed"
        )
    return x0, y0, x1, y1


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file or bytes as RGB (decoded now, so errors surface here)."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()
    return image.convert("RGB")


def to_tensor(image: Image.Image, bbox: BBox | None, preprocess: Preprocess) -> torch.Tensor:
    """Crop (with context) -> square resize -> normalised float tensor [3, S, S] on the CPU."""
    box = bbox_to_pixels(image.width, image.height, bbox, preprocess.context if bbox is not None else 0.0)
    crop = image.crop(box).resize((preprocess.image_size, preprocess.image_size), Image.Resampling.BILINEAR)
    array = np.asarray(crop, dtype=np.float32) / 255.0
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


class Embedder:
    """Frozen backbone + optional head on one device. Without a head it returns L2-normalised backbone
    features (the untrained-backbone kNN baseline)."""

    def __init__(
        self,
        backbone: Backbone,
        head: CompatibilityHead | None = None,
        context: float = 0.1,
        device: str | torch.device = "auto",
        head_sha256: str | None = None,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.backbone = backbone
        self.preprocess = Preprocess(backbone.image_size, backbone.mean, backbone.std, context)
        self.head = head
        self.head_sha256 = head_sha256
        # channels_last speeds up the depthwise/pointwise convs of the CNN backbones on CPU and GPU alike.
        self.model = backbone.model.to(self.device, memory_format=torch.channels_last).eval()
        if head is not None:
            head.to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.head.config.out_dim if self.head is not None else self.backbone.dim

    def transform(self, image: Image.Image, bbox: BBox | None = None) -> torch.Tensor:
        return to_tensor(image, bbox, self.preprocess)

    @torch.inference_mode()
    def backbone_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, backbone.dim] (float32, on the CPU) of a preprocessed batch."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                features = self.model(batch)
        else:
            features = self.model(batch)
        return features.float().cpu()

    @torch.inference_mode()
    def project(self, features: torch.Tensor | np.ndarray, kind: Kind) -> np.ndarray:
        """Head (or plain L2 normalisation without one) on backbone features: [B, dim] float32 unit rows."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if self.head is None:
            return F.normalize(features, dim=-1).numpy()
        return self.head(features.to(self.device), kind).float().cpu().numpy()

    def embed(self, images: Sequence[Image.Image], bboxes: Sequence[BBox | None] | None, kind: Kind) -> np.ndarray:
        """Embed images (scene photos with their item bboxes, or product images with None)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        boxes = bboxes if bboxes is not None else [None] * len(images)
        batch = torch.stack([self.transform(image, box) for image, box in zip(images, boxes, strict=True)])
        return self.embed_batch(batch, kind)

    def embed_batch(self, batch: torch.Tensor, kind: Kind) -> np.ndarray:
        return self.project(self.backbone_features(batch), kind)

    def fingerprint(self) -> dict:
        """What must match between an index and the embedder that queries it."""
        return {
            "backbone": self.backbone.name,
            "backbone_weights_sha256": self.backbone.weights_sha256,
            "preprocess": self.preprocess.to_dict(),
            "head_sha256": self.head_sha256,
            "dim": self.dim,
            "metric": METRIC,
        }

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "auto", backbone_weights: str | Path | None = None
    ) -> Embedder:
        from training.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        backbone = load_backbone(checkpoint.backbone_name, backbone_weights)
        checkpoint.check_backbone(backbone)
        return cls(backbone, checkpoint.build_head(), checkpoint.preprocess.context, device, checkpoint.sha256)
