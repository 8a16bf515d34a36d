"""Preprocessing, the first stage of the one image -> vector path, as torch tensors.

Decode, crop with context, resize and normalise live in `training.model.arrays` (PIL + numpy, no torch)
and are re-exported here; this module only wraps their arrays in tensors, so torch and the exported
runtimes are fed the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from training.data.stl import BBox
from training.model.arrays import (
    MIN_CROP_PIXELS,
    CropTooSmall,
    Preprocess,
    bbox_to_pixels,
    load_array,
    load_image,
    load_image_for,
    to_array,
)

__all__ = ["MIN_CROP_PIXELS", "CropTooSmall", "Preprocess", "bbox_to_pixels", "load_array", "load_crop",
           "load_image", "load_image_for", "to_array", "to_tensor"]


def to_tensor(image: Image.Image, bbox: BBox | None, preprocess: Preprocess) -> torch.Tensor:
    """Crop (with context) -> square resize -> normalised float tensor [3, S, S] on the CPU."""
    return torch.from_numpy(to_array(image, bbox, preprocess))


def load_crop(source: str | Path | bytes, bbox: BBox | None, preprocess: Preprocess) -> torch.Tensor:
    """Decode + crop + resize + normalise a file: what data-loader workers run (picklable, no model)."""
    return torch.from_numpy(load_array(source, bbox, preprocess))
