"""Small artifacts shared by the index and service tests."""

from __future__ import annotations

from pathlib import Path

import torch

from training.backbones import load_backbone
from training.checkpoint import Checkpoint, save_checkpoint
from training.embedder import Preprocess
from training.head import CompatibilityHead, HeadConfig


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random (seeded) 16-d head on the `tiny` backbone, saved as a real checkpoint."""
    backbone = load_backbone("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = CompatibilityHead(HeadConfig(in_dim=backbone.dim, hidden_dim=32, out_dim=16)).eval()
    save_checkpoint(path, Checkpoint(
        head_config=head.config,
        state_dict=head.state_dict(),
        backbone_name=backbone.name,
        backbone_weights_sha256=backbone.weights_sha256,
        preprocess=Preprocess(backbone.image_size, backbone.mean, backbone.std, 0.1),
        train_config={"split_seed": 0},
    ))
    return path
