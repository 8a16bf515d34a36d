"""Preprocessing in PIL + numpy only: the config, decode, crop with context, square resize, normalise.

The torch-free half of the one image -> vector path, and its only copy: `preprocess.to_tensor` is
`torch.from_numpy(to_array(...))`, so every runtime (torch, ONNX Runtime, OpenVINO) is fed the same pixels,
and a serving process that runs an exported model needs neither torch nor the embedder.
`training.model.preprocess` re-exports everything here, so older imports keep working.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training.data.stl import BBox
from training.errors import DataError

MIN_CROP_PIXELS = 4  # a crop narrower or shorter than this carries no usable signal
# bbox * size lands a hair off an integer in floating point (0.7 * 10 = 7.000000000000001); without this
# slack ceil() would add a whole pixel column to an exact box.
_PIXEL_EPS = 1e-6


class CropTooSmall(DataError):
    """The bbox crop has too few pixels to embed."""


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context: float = 0.1  # fraction of the box's width/height added on each side of a scene crop
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop still covers image_size pixels a side: several
    # times cheaper to decode big photos, but the pixels differ slightly from a full decode, so it is part
    # of the fingerprint and honoured only by `load_image_for` (`Embedder.load_image`, `load_crop`).
    jpeg_draft: bool = False
    # PIL's `reducing_gap` for the square resize: a box-filter reduce() by an integer factor first, then the
    # bilinear resize over the last >= reducing_gap x. The item detector's whole-photo resize sets it (a phone
    # photo of 7 MP to 320 px: 23 -> 8 ms, pixels within one level of 255); a source under reducing_gap x the
    # output size a side resizes exactly as without it. None (the embedder's): the plain bilinear resize.
    # Left out of the dict while None, so every preprocessing written before it keeps its fingerprint.
    reducing_gap: float | None = None

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not (math.isfinite(self.context) and self.context >= 0.0):
            raise ValueError(f"context must be a finite fraction >= 0, got {self.context}")
        if self.reducing_gap is not None and not (math.isfinite(self.reducing_gap) and self.reducing_gap >= 1.0):
            raise ValueError(f"reducing_gap must be None or a finite number >= 1, got {self.reducing_gap}")

    def to_dict(self) -> dict:
        raw = {**asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if self.reducing_gap is None:
            del raw["reducing_gap"]
        return raw

    @classmethod
    def from_dict(cls, raw: dict) -> Preprocess:
        return cls(
            int(raw["image_size"]),
            tuple(raw["mean"]),
            tuple(raw["std"]),
            float(raw["context"]),
            bool(raw.get("jpeg_draft", False)),  # absent in files written before the option existed
            None if raw.get("reducing_gap") is None else float(raw["reducing_gap"]),
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


def to_array(image: Image.Image, bbox: BBox | None, preprocess: Preprocess,
             out: np.ndarray | None = None) -> np.ndarray:
    """Crop (with context) -> square resize -> normalised float32 array [3, S, S], C-contiguous; written into
    `out` (a float32 [3, S, S], e.g. a row of a batch) when given, and returned."""
    size = preprocess.image_size
    if out is not None and (out.shape != (3, size, size) or out.dtype != np.float32):
        raise ValueError(f"out must be float32 [3, {size}, {size}], got {out.dtype} {list(out.shape)}")
    box = bbox_to_pixels(image.width, image.height, bbox, preprocess.context if bbox is not None else 0.0)
    # The whole image needs no crop: crop() would copy every pixel first (a 7 MP photo: ~5 ms), for the same result.
    whole = box == (0, 0, image.width, image.height)
    crop = (image if whole else image.crop(box)).resize((size, size), Image.Resampling.BILINEAR,
                                                        reducing_gap=preprocess.reducing_gap)
    # One fused affine per channel: (x / 255 - mean) / std == x * a + b. The HWC -> CHW transpose is read
    # from the uint8 pixels by the multiply itself, which writes the planar float32 result once: two passes
    # over the floats instead of four (decode workers spend ~0.4 ms less per crop; the same bits).
    std = np.asarray(preprocess.std, dtype=np.float32)
    scale = 1.0 / (255.0 * std)
    shift = -np.asarray(preprocess.mean, dtype=np.float32) / std
    array = np.empty((3, size, size), dtype=np.float32) if out is None else out
    np.multiply(np.asarray(crop).transpose(2, 0, 1), scale[:, None, None], out=array, dtype=np.float32)
    array += shift[:, None, None]
    return array


def load_array(source: str | Path | bytes, bbox: BBox | None, preprocess: Preprocess,
               out: np.ndarray | None = None) -> np.ndarray:
    """Decode + crop + resize + normalise a file into the array every runtime takes (picklable, no model);
    into `out` when given (`to_array`)."""
    return to_array(load_image_for(source, bbox, preprocess), bbox, preprocess, out)
