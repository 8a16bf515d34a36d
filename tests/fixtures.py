"""Small datasets and artifacts shared by the index and service tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.model.backbones import load_backbone
from training.model.checkpoint import Checkpoint, TrainRecord, save_checkpoint
from training.model.head import CompatibilityHead, HeadConfig
from training.model.preprocess import Preprocess


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
        train_config=TrainRecord(split_seed=0),
    ))
    return path


def random_picture(rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A square of random colour with three random rectangles: distinct enough for tiny backbones."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
        pen.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def save_picture(path: Path, rng: np.random.Generator, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    random_picture(rng, size).save(path, "JPEG", quality=90)


def write_tiny_dataset(
    root: Path, categories: dict[str, int], scenes: int, items_per_scene: int, seed: int = 0
) -> Path:
    """An STL-format dataset: `categories` {path: product count}, each scene pairing random products."""
    rng = np.random.default_rng(seed)
    product_categories: dict[str, str] = {}
    for c, (category, count) in enumerate(categories.items()):
        for i in range(count):
            pid = f"p{c}x{i:03d}"
            product_categories[pid] = category
            save_picture(root / "images" / "products" / f"{pid}.jpg", rng)
    product_ids = sorted(product_categories)
    with (root / "pairs.jsonl").open("w") as pairs:
        for s in range(scenes):
            sid = f"s{s:03d}"
            save_picture(root / "images" / "scenes" / f"{sid}.jpg", rng, size=64)
            for pid in rng.choice(product_ids, size=items_per_scene, replace=False):
                pairs.write(json.dumps({"scene": sid, "product": str(pid), "bbox": [0.1, 0.1, 0.6, 0.7]}) + "\n")
    (root / "categories.json").write_text(json.dumps(product_categories))
    return root
