"""Tiny synthetic STL datasets and a tiny-backbone head checkpoint for the index tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from index.build import build
from tests.fixtures import make_tiny_checkpoint

CATEGORIES = {
    "Apparel & Accessories|Shoes": 9,
    "Apparel & Accessories|Clothing|Pants": 7,
    "Apparel & Accessories|Handbags, Wallets & Cases": 5,
}


def draw_image(path: Path, rng: np.random.Generator, size: int = 48) -> None:
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = x0 + rng.integers(8, size // 2), y0 + rng.integers(8, size // 2)
        draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)


def make_dataset(root: Path, categories: dict[str, int] = CATEGORIES, scenes: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    product_categories: dict[str, str] = {}
    for c, (category, count) in enumerate(categories.items()):
        for i in range(count):
            pid = f"p{c}x{i:03d}"
            product_categories[pid] = category
            draw_image(root / "images" / "products" / f"{pid}.jpg", rng)
    product_ids = sorted(product_categories)
    with (root / "pairs.jsonl").open("w") as pairs:
        for s in range(scenes):
            sid = f"s{s:03d}"
            draw_image(root / "images" / "scenes" / f"{sid}.jpg", rng, size=64)
            for pid in rng.choice(product_ids, size=2, replace=False):
                pairs.write(json.dumps({"scene": sid, "product": str(pid), "bbox": [0.1, 0.1, 0.6, 0.7]}) + "\n")
    (root / "categories.json").write_text(json.dumps(product_categories))
    return root


make_checkpoint = make_tiny_checkpoint


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def checkpoint_path(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "model.pt")


@pytest.fixture
def artifacts(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path) -> Path:
    """An artifact root with one published version built from the tiny dataset."""
    root = tmp_path / "artifacts"
    build(dataset_dir, checkpoint_path, root, device="cpu", workers=0, progress=False)
    return root
