"""Head checkpoints that carry everything needed to rebuild the embedder exactly."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.io import atomic_path
from training.model.backbones import Backbone
from training.model.embedder import Preprocess
from training.model.head import CompatibilityHead, HeadConfig

FORMAT_VERSION = 1


class CheckpointMismatch(ValueError):
    """The checkpoint was trained on another backbone, weights or preprocessing."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    head_config: HeadConfig
    state_dict: dict[str, torch.Tensor]
    backbone_name: str
    backbone_weights_sha256: str
    preprocess: Preprocess
    train_config: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    metrics: dict = field(default_factory=dict)
    sha256: str | None = None  # of the file it was read from

    def build_head(self) -> CompatibilityHead:
        head = CompatibilityHead(self.head_config)
        head.load_state_dict(self.state_dict, strict=True)
        return head.eval()

    def check_backbone(self, backbone: Backbone) -> None:
        if backbone.name != self.backbone_name or backbone.weights_sha256 != self.backbone_weights_sha256:
            raise CheckpointMismatch(
                f"checkpoint was trained on backbone {self.backbone_name!r} "
                f"(weights {self.backbone_weights_sha256[:12]}), but the embedder has {backbone.name!r} "
                f"(weights {backbone.weights_sha256[:12]}); use the backbone it was trained with"
            )
        if backbone.dim != self.head_config.in_dim:
            raise CheckpointMismatch(
                f"head expects {self.head_config.in_dim}-d features, backbone gives {backbone.dim}"
            )
        # The context margin may differ per checkpoint, but size and normalisation are the backbone's own:
        # a difference means the head was trained on differently preprocessed images.
        trained = (self.preprocess.image_size, tuple(self.preprocess.mean), tuple(self.preprocess.std))
        current = (backbone.image_size, tuple(backbone.mean), tuple(backbone.std))
        if trained != current:
            raise CheckpointMismatch(
                f"checkpoint was trained with preprocessing (size, mean, std) {trained}, "
                f"but backbone {backbone.name!r} uses {current}"
            )


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> str:
    """Write atomically (temp file + rename) and return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "head_config": checkpoint.head_config.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in checkpoint.state_dict.items()},
        "backbone": {"name": checkpoint.backbone_name, "weights_sha256": checkpoint.backbone_weights_sha256},
        "preprocess": checkpoint.preprocess.to_dict(),
        "train_config": checkpoint.train_config,
        "data_fingerprint": checkpoint.data_fingerprint,
        "metrics": checkpoint.metrics,
    }
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return file_sha256(path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        # weights_only: a checkpoint is data, never code to execute
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointMismatch(f"{path} is not a readable head checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path} is not a head checkpoint of format {FORMAT_VERSION}")
    try:
        return Checkpoint(
            head_config=HeadConfig(**payload["head_config"]),
            state_dict=payload["state_dict"],
            backbone_name=payload["backbone"]["name"],
            backbone_weights_sha256=payload["backbone"]["weights_sha256"],
            preprocess=Preprocess.from_dict(payload["preprocess"]),
            train_config=payload.get("train_config", {}),
            data_fingerprint=payload.get("data_fingerprint", ""),
            metrics=payload.get("metrics", {}),
            sha256=file_sha256(path),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointMismatch(f"{path} is an incomplete head checkpoint: {exc!r}") from exc


def data_fingerprint(pairs_file: str | Path, categories_file: str | Path) -> str:
    """sha256 over the pair file and the category file: which data a head was trained on."""
    digest = hashlib.sha256()
    for path in (pairs_file, categories_file):
        digest.update(Path(path).name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()
