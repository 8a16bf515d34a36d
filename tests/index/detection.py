"""A tiny shop of coloured boxes with an item detector trained on it in a few seconds (tiny backbone):
shared by the index, service and browser tests of /detect and /shop."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from index.build import build
from tests.fixtures import BOX_CATEGORIES, make_tiny_checkpoint, write_box_dataset
from training.data.products import PRODUCTS_FILE, Product, write_products
from training.fit.detector import DetectorFitOptions, fit_detector

SHOES, BAGS = (category for category, _ in BOX_CATEGORIES.values())
SCENE_SIZE = 64
# Tiny and quick: about 2 s on one core; finds the red square (Shoes) and the blue bar (Bags) of every scene.
DETECTOR_OPTIONS = DetectorFitOptions(backbone="tiny", image_size=SCENE_SIZE, fpn_channels=32, head_convs=1,
                                      epochs=25, batch_size=4, lr=1e-2, patience=25)
EXTRA_PRODUCTS = 5  # per category, shades of its colour, so that a search has several products to rank


def write_box_shop(root: Path, scenes: int = 16, seed: int = 0) -> Path:
    """`write_box_dataset`'s scenes, with a few more products per category (shades of its colour)."""
    data = write_box_dataset(root, scenes=scenes, size=SCENE_SIZE, seed=seed)
    categories = json.loads((data / "categories.json").read_text())
    for name, (category, colour) in BOX_CATEGORIES.items():
        for shade in range(EXTRA_PRODUCTS):
            pid = f"{name}{shade}"
            tinted = tuple(max(0, min(255, value + 12 * (shade + 1) - 30)) for value in colour)
            Image.new("RGB", (24, 24), tinted).save(data / "images" / "products" / f"{pid}.jpg")
            categories[pid] = category
    (data / "categories.json").write_text(json.dumps(categories))
    write_products(data / PRODUCTS_FILE, [Product(id=pid, title=f"{pid.capitalize()} item", brand="Acme", price=20.0,
                                                  currency="EUR", in_stock=True) for pid in sorted(categories)])
    return data


def train_tiny_detector(data: Path, out: Path) -> Path:
    """A detector checkpoint for the box shop (one torch thread: tiny convs are faster that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_detector(data, out, DETECTOR_OPTIONS, cache=out / "cache", device="cpu", workers=0,
                            progress=False).path
    finally:
        torch.set_num_threads(threads)


def scene_bytes(data: Path, scene: str = "s000") -> bytes:
    return (data / "images" / "scenes" / f"{scene}.jpg").read_bytes()


def truth(data: Path, scene: str = "s000") -> dict[str, list[float]]:
    """Category -> true box of a scene."""
    categories = json.loads((data / "categories.json").read_text())
    boxes = {}
    for line in (data / "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        if pair["scene"] == scene:
            boxes[categories[pair["product"]]] = pair["bbox"]
    return boxes


def build_box_shop(base: Path, with_detector: bool = True) -> dict[str, Path]:
    """The box shop indexed by the real build (tiny random head) with its trained detector; returns paths."""
    data = write_box_shop(base / "data")
    detector = train_tiny_detector(data, base / "detector") if with_detector else None
    head = make_tiny_checkpoint(base / "head.pt")
    root = base / "artifacts"
    build(data, head, root, device="cpu", workers=0, progress=False, duplicate_threshold=0.0, detector=detector)
    return {"data": data, "root": root, "head": head, **({"detector": detector} if detector else {})}
