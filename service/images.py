"""Turning an uploaded file into a decoded RGB image, refusing what a client got wrong with a clear reason."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

from training.data.stl import BBox, validate_bbox
from training.model.arrays import CropTooSmall, load_image

LOG = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class BadInput(ValueError):
    """The client's mistake: `status` is the HTTP status to answer with, the message says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(
    data: bytes, max_pixels: int, loader: Callable[[bytes], Image.Image] = load_image
) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to RGB, checking format and pixel count from the header before decoding.

    `loader` does the decoding: pass the embedder's own (`embedder.load_image`) so the service decodes
    exactly as the index build did. CropTooSmall from it propagates unchanged.
    """
    if not data:
        raise BadInput(400, "the image file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            image_format, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError as exc:
        raise BadInput(413, f"image has too many pixels (decompression bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadInput(400, f"the uploaded file is not an image; send one of {list(ALLOWED_FORMATS)}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadInput(400, f"the image header is truncated or corrupt: {exc}") from exc
    if image_format not in ALLOWED_FORMATS:
        raise BadInput(415, f"unsupported image format {image_format}; send one of {list(ALLOWED_FORMATS)}")
    # Checked from the header alone: a small file can declare a huge canvas (decompression bomb).
    if width * height > max_pixels:
        raise BadInput(413, f"image is {width}x{height} = {width * height} pixels; at most {max_pixels} allowed")
    if width < 1 or height < 1:
        raise BadInput(400, f"image has no pixels ({width}x{height})")
    try:
        # The same decoder the index build and training use, so serving sees the pixels they saw.
        return loader(data)
    except CropTooSmall:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput(413, f"image has too many pixels (decompression bomb guard): {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # PIL reports truncated and corrupt data as OSError ("image file is truncated", "broken data stream").
        raise BadInput(400, f"the image is truncated or corrupt: {exc}") from exc


def parse_bbox(text: str | None) -> BBox | None:
    """`"left,top,right,bottom"` in [0, 1] (origin top-left) -> a validated box; None or blank = whole image."""
    if text is None or not text.strip():
        return None
    parts = [part.strip() for part in text.split(",")]
    if len(parts) != 4:
        raise BadInput(400, f"bbox must be 4 comma-separated numbers 'left,top,right,bottom', got {text!r}")
    values: list[float] = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise BadInput(400, f"bbox values must be numbers, got {part!r} in {text!r}") from None
        if not math.isfinite(value):
            raise BadInput(400, f"bbox values must be finite, got {part!r}")
        values.append(value)
    try:
        return validate_bbox(values)
    except ValueError as exc:
        raise BadInput(400, str(exc)) from exc
