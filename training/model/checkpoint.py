"""Head checkpoints that carry everything needed to rebuild the embedder exactly, and `load_embedder`.

This module sits above the embedder (open_clip's `factory.py` shape): it imports `Embedder`, and the
embedder knows nothing of checkpoints, so no import goes both ways.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.data.split import SPLIT_FRACTIONS
from training.errors import ModelMismatch, one_line
from training.io import atomic_path, file_sha256
from training.model.backbones import Backbone, load_backbone
from training.model.embedder import Embedder
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import Preprocess

FORMAT_VERSION = 1


class CheckpointMismatch(ModelMismatch):
    """The checkpoint was trained on another backbone, weights or preprocessing, or is not a checkpoint."""


@dataclass(frozen=True)
class TrainRecord:
    """How a head was trained, as the checkpoint stores it: read and written here only.

    `split_seed` and `split_fractions` say which scenes were training scenes, so `index build` can
    count popularity on exactly those pairs. `args` are the resolved arguments (a rerun with the same
    ones on the same data is up to date); `trainer` is the trainer's own config.
    """

    split_seed: int = 0
    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
    args: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "split_fractions": list(self.split_fractions)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainRecord:
        args = dict(raw.get("args", {}))
        # Checkpoints written before this record existed kept the seed only inside "args".
        seed = raw.get("split_seed", args.get("split_seed", 0))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CheckpointMismatch(f"train config has a split_seed that is not an integer: {seed!r}")
        fractions = tuple(float(value) for value in raw.get("split_fractions", SPLIT_FRACTIONS))
        if len(fractions) != 3:
            raise CheckpointMismatch(f"train config has split_fractions of length {len(fractions)}, not 3")
        return cls(split_seed=seed, split_fractions=fractions, args=args,  # type: ignore[arg-type]
                   trainer=dict(raw.get("trainer", {})))


@dataclass
class Checkpoint:
    head_config: HeadConfig
    state_dict: dict[str, torch.Tensor]
    backbone_name: str
    backbone_weights_sha256: str
    preprocess: Preprocess
    train_config: TrainRecord = field(default_factory=TrainRecord)
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
        "train_config": checkpoint.train_config.to_dict(),
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
        raise CheckpointMismatch(f"{path} is not a readable head checkpoint ({one_line(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path} is not a head checkpoint of format {FORMAT_VERSION}")
    try:
        return Checkpoint(
            head_config=HeadConfig(**payload["head_config"]),
            state_dict=payload["state_dict"],
            backbone_name=payload["backbone"]["name"],
            backbone_weights_sha256=payload["backbone"]["weights_sha256"],
            preprocess=Preprocess.from_dict(payload["preprocess"]),
            train_config=TrainRecord.from_dict(payload.get("train_config", {})),
            data_fingerprint=payload.get("data_fingerprint", ""),
            metrics=payload.get("metrics", {}),
            sha256=file_sha256(path),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointMismatch(f"{path} is an incomplete head checkpoint ({one_line(exc)})") from exc


def load_embedder(
    path: str | Path, device: str | torch.device = "auto", backbone_weights: str | Path | None = None
) -> Embedder:
    """The embedder a checkpoint describes: its backbone (checked), head and preprocessing."""
    checkpoint = load_checkpoint(path)
    backbone = load_backbone(checkpoint.backbone_name, backbone_weights)
    checkpoint.check_backbone(backbone)
    saved = checkpoint.preprocess
    embedder = Embedder(backbone, checkpoint.build_head(), saved.context, device, checkpoint.sha256,
                        jpeg_draft=saved.jpeg_draft)
    if embedder.preprocess != saved:
        raise CheckpointMismatch(
            f"checkpoint {path} was trained with preprocessing {saved.to_dict()}, but backbone "
            f"{backbone.name!r} preprocesses as {embedder.preprocess.to_dict()}"
        )
    return embedder
