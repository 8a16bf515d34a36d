"""The one path from an image (and optional bbox) to a vector, shared by training, index build and service.

crop with context -> resize -> normalise -> frozen backbone -> head -> L2 normalise. Anything that
turns an image into a vector goes through `Embedder`, so train and serve cannot drift apart.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from training.data.stl import BBox, Kind
from training.model.backbones import Backbone
from training.model.device import resolve_device
from training.model.head import CompatibilityHead
from training.model.preprocess import Preprocess, load_image_for, to_tensor

LOG = logging.getLogger(__name__)

METRIC = "inner_product"  # vectors are unit norm, so inner product is cosine similarity


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
