"""The one path from an image (and optional bbox) to a vector, shared by training, index build and service.

crop with context -> resize -> normalise -> frozen backbone -> head -> L2 normalise. Anything that
turns an image into a vector goes through `Embedder`, so train and serve cannot drift apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F

from training.data.stl import BBox
from training.model.backbones import Backbone, load_backbone
from training.model.device import resolve_device
from training.model.head import CompatibilityHead, Kind

LOG = logging.getLogger(__name__)

METRIC = "inner_product"  # vectors are unit norm, so inner product is cosine similarity
MIN_CROP_PIXELS = 4  # a crop narrower or shorter than this carries no usable signal
# bbox * size lands a hair off an integer in floating point (0.7 * 10 = 7.000000000000001); without this
# slack ceil() would add a whole pixel column to an exact box.
_PIXEL_EPS = 1e-6


class CropTooSmall(ValueError):
    pass


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context: float = 0.1  # fraction of the box's width/height added on each side of a scene crop
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop still covers image_size pixels a side: several
    # times cheaper to decode big photos, but the pixels differ slightly from a full decode, so it is part
    # of the fingerprint and honoured only by `Embedder.load_image` / `load_crop`.
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not (math.isfinite(self.context) and self.context >= 0.0):
            raise ValueError(f"context must be a finite fraction >= 0, got {self.context}")

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocess:
        return cls(
            int(raw["image_size"]),
            tuple(raw["mean"]),
            tuple(raw["std"]),
            float(raw["context"]),
            bool(raw.get("jpeg_draft", False)),  # absent in files written before the option existed
        )

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def bbox_to_pixels(width: int, height: int, bbox: BBox | None, context: float = 0.0) -> tuple[int, int, int, int]:
    """Pixel box `(x0, y0, x1, y1)` (x1, y1 exclusive) of a normalised bbox grown by `context`, clamped.

    `bbox=None` is the whole image. Raises CropTooSmall when the crop is under MIN_CROP_PIXELS a side.
    """
    if bbox is None:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        left, top, right, bottom = bbox
        pad_x, pad_y = (right - left) * context, (bottom - top) * context
        x0 = max(0, math.floor((left - pad_x) * width + _PIXEL_EPS))
        y0 = max(0, math.floor((top - pad_y) * height + _PIXEL_EPS))
        x1 = min(width, math.ceil((right + pad_x) * width - _PIXEL_EPS))
        y1 = min(height, math.ceil((bottom + pad_y) * height - _PIXEL_EPS))
    if x1 - x0 < MIN_CROP_PIXELS or y1 - y0 < MIN_CROP_PIXELS:
        raise CropTooSmall(
            f"the crop is {max(0, x1 - x0)}x{max(0, y1 - y0)} pixels of a {width}x{height} image; "
            f"at least {MIN_CROP_PIXELS}x{MIN_CROP_PIXELS} is needed"
        )
    return x0, y0, x1, y1


def _open(source: str | Path | bytes) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def _finish(image: Image.Image) -> Image.Image:
    """Decode now (so errors surface here), apply EXIF orientation (phone photos), convert to RGB."""
    image.load()
    # In place and no RGB->RGB convert: each copy of a freshly decoded photo costs ~0.6 ms of page faults
    # (0.6 MP JPEG: 2.6 -> 0.7 ms to load), and the pixels are the same.
    ImageOps.exif_transpose(image, in_place=True)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file or bytes as RGB at full resolution (decoded now, so errors surface here)."""
    return _finish(_open(source))


def load_image_for(source: str | Path | bytes, bbox: BBox | None, preprocess: Preprocess) -> Image.Image:
    """Like `load_image`, but with `preprocess.jpeg_draft` a JPEG is decoded at the smallest DCT scale
    that still gives the (context-grown) crop at least `image_size` pixels a side."""
    image = _open(source)
    if preprocess.jpeg_draft and image.format == "JPEG":
        orientation = image.getexif().get(0x0112, 1)
        width, height = image.size
        if orientation in (5, 6, 7, 8):  # stored rotated by 90 degrees: the bbox's x is the file's y
            width, height = height, width
        x0, y0, x1, y1 = bbox_to_pixels(width, height, bbox, preprocess.context if bbox is not None else 0.0)
        scale = min((x1 - x0) / preprocess.image_size, (y1 - y0) / preprocess.image_size)
        if scale >= 2.0:
            # draft() picks the largest reduction whose result is still >= the requested size.
            wanted = (math.ceil(image.size[0] / scale), math.ceil(image.size[1] / scale))
            image.draft("RGB", wanted)
    return _finish(image)


def to_tensor(image: Image.Image, bbox: BBox | None, preprocess: Preprocess) -> torch.Tensor:
    """Crop (with context) -> square resize -> normalised float tensor [3, S, S] on the CPU."""
    box = bbox_to_pixels(image.width, image.height, bbox, preprocess.context if bbox is not None else 0.0)
    crop = image.crop(box).resize((preprocess.image_size, preprocess.image_size), Image.Resampling.BILINEAR)
    array = np.array(crop, dtype=np.float32)
    # One fused affine per channel: (x / 255 - mean) / std == x * a + b, in place (no temporaries to fault in).
    array *= 1.0 / (255.0 * np.asarray(preprocess.std, dtype=np.float32))
    array += -np.asarray(preprocess.mean, dtype=np.float32) / np.asarray(preprocess.std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_crop(source: str | Path | bytes, bbox: BBox | None, preprocess: Preprocess) -> torch.Tensor:
    """Decode + crop + resize + normalise a file: what data-loader workers run (picklable, no model)."""
    return to_tensor(load_image_for(source, bbox, preprocess), bbox, preprocess)


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Run a module in eval mode and give it back in the mode the caller left it in (e.g. a trainer's)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def freeze_for_cpu(model: torch.nn.Module, image_size: int, memory_format: torch.memory_format) -> torch.nn.Module:
    """Trace and freeze a frozen backbone for CPU inference (BatchNorm folded into the convs, constants inlined).

    Measured on efficientnet_lite0, 2 CPU cores: 13.4 -> 9.5 ms for one crop and 245 -> 145 ms for 16, with
    outputs equal to the eager model within 1e-5. Falls back to the eager model if tracing fails.
    """
    example = torch.zeros(2, 3, image_size, image_size).contiguous(memory_format=memory_format)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile, which
            # needs a C++ toolchain and half a minute of compilation at every start; jit still does the job
            return torch.jit.freeze(torch.jit.trace(model, example))
    except Exception as exc:  # an exotic backbone jit cannot trace: correctness first, speed second
        LOG.warning("could not freeze the backbone for CPU inference (%s); running it eagerly", exc)
        return model


class Embedder:
    """Frozen backbone + optional head on one device. Without a head it returns L2-normalised backbone
    features (the untrained-backbone kNN baseline).

    Inference always runs the head in eval mode (BatchNorm running stats, no dropout), even when a trainer
    sharing the head object has it in train mode; the head's mode is restored afterwards.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: CompatibilityHead | None = None,
        context: float = 0.1,
        device: str | torch.device = "auto",
        head_sha256: str | None = None,
        channels_last: bool = True,
        jpeg_draft: bool = False,
        freeze: bool = True,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.backbone = backbone
        self.preprocess = Preprocess(backbone.image_size, backbone.mean, backbone.std, context, jpeg_draft)
        self.head = head
        self.head_sha256 = head_sha256
        # channels_last: efficientnet_lite0 at batch 32 on our 2-core CPU runs ~2x faster with it
        # (0.64-0.80 s vs 1.3-2.5 s a batch); oneDNN and cuDNN both prefer NHWC for these convs.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = backbone.model.to(self.device, memory_format=self.memory_format).eval()
        if self.device.type == "cpu" and freeze:
            self.model = freeze_for_cpu(self.model, backbone.image_size, self.memory_format)
        if head is not None:
            head.to(self.device).eval()

    @property
    def dim(self) -> int:
        return self.head.config.out_dim if self.head is not None else self.backbone.dim

    def transform(self, image: Image.Image, bbox: BBox | None = None) -> torch.Tensor:
        """Preprocess one decoded image (crop with context when bbox is given): [3, S, S] float32."""
        return to_tensor(image, bbox, self.preprocess)

    def load_image(self, source: str | Path | bytes, bbox: BBox | None = None) -> Image.Image:
        """Decode a file as this embedder's preprocessing wants it (JPEG draft when enabled)."""
        return load_image_for(source, bbox, self.preprocess)

    @torch.inference_mode()
    def backbone_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, backbone.dim] (float32, on the CPU) of a preprocessed batch."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a batch [B, 3, H, W] from transform(), got shape {tuple(batch.shape)}")
        if len(batch) == 0:
            return torch.zeros((0, self.backbone.dim), dtype=torch.float32)
        self.model.eval()  # frozen backbone: never batch statistics, whatever a caller did to it
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                features = self.model(batch)
        else:
            features = self.model(batch)
        return features.float().cpu()

    @torch.inference_mode()
    def project(self, features: torch.Tensor | np.ndarray, kind: Kind) -> np.ndarray:
        """Head (or plain L2 normalisation without one) on backbone features: [B, dim] float32 unit rows."""
        if kind not in ("scene", "product"):
            raise ValueError(f"kind must be 'scene' or 'product', got {kind!r}")
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[1] != self.backbone.dim:
            raise ValueError(
                f"expected backbone features [B, {self.backbone.dim}], got shape {tuple(features.shape)}"
            )
        if len(features) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.head is None:
            return F.normalize(features, dim=-1).numpy()
        with _eval_mode(self.head):
            vectors = self.head(features.to(self.device), kind)
        return F.normalize(vectors.float(), dim=-1).cpu().numpy()

    def embed(self, images: Sequence[Image.Image], bboxes: Sequence[BBox | None] | None, kind: Kind) -> np.ndarray:
        """Embed images (scene photos with their item bboxes, or product images with None)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        boxes = bboxes if bboxes is not None else [None] * len(images)
        if len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} bboxes")
        batch = torch.stack([self.transform(image, box) for image, box in zip(images, boxes, strict=True)])
        return self.embed_batch(batch, kind)

    def embed_batch(self, batch: torch.Tensor, kind: Kind) -> np.ndarray:
        """Vectors of a batch stacked from `transform` outputs."""
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
        from training.model.checkpoint import CheckpointMismatch, load_checkpoint

        checkpoint = load_checkpoint(path)
        backbone = load_backbone(checkpoint.backbone_name, backbone_weights)
        checkpoint.check_backbone(backbone)
        saved = checkpoint.preprocess
        embedder = cls(backbone, checkpoint.build_head(), saved.context, device, checkpoint.sha256,
                       jpeg_draft=saved.jpeg_draft)
        if embedder.preprocess != saved:
            raise CheckpointMismatch(
                f"checkpoint {path} was trained with preprocessing {saved.to_dict()}, but backbone "
                f"{backbone.name!r} preprocesses as {embedder.preprocess.to_dict()}"
            )
        return embedder
