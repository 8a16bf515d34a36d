"""Small datasets and artifacts shared by the index and service tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image, ImageDraw

from training.cli import synth
from training.data.split import split_by_scene
from training.data.stl import Pair, STLDataset, product_path, scene_path, write_pairs
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


# ---------------------------------------------------------------- evaluation (tests/training/eval, cli)

RANKING_CATEGORIES = {
    **{f"shoe{i}": "Apparel|Shoes" for i in range(7)},
    **{f"pant{i}": "Apparel|Clothing|Pants" for i in range(4)},
    "ring0": "Apparel|Jewelry|Rings",  # a one-product category: HR is 1, no negative exists
}
RANKING_PRODUCTS = sorted(RANKING_CATEGORIES)
RANKING_COLD_PRODUCT = "shoe6"  # paired with test scenes only: a cold-start product
RANKING_SCENES = 80


def _solid_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=90)


def write_ranking_dataset(root: Path) -> Path:
    """A tiny STL-format dataset for the evaluation tests: solid-colour images, a skewed pair distribution
    over products, one cold-start product paired with test scenes only."""
    rng = np.random.default_rng(0)
    for index, product in enumerate(RANKING_PRODUCTS):
        _solid_jpeg(root / "images" / "products" / f"{product}.jpg", (20 * index, 255 - 20 * index, 90))
    warm = [p for p in RANKING_PRODUCTS if p != RANKING_COLD_PRODUCT]
    weights = 1.0 / np.array([1 + int(p[-1]) for p in warm]) ** 2  # product 0 of each category most popular
    weights /= weights.sum()
    pairs = []
    for scene in range(RANKING_SCENES):
        scene_id = f"scene{scene:03d}"
        _solid_jpeg(root / "images" / "scenes" / f"{scene_id}.jpg", (scene * 3, 128, 255 - scene * 3), (32, 32))
        for product in rng.choice(warm, size=int(rng.integers(1, 3)), replace=False, p=weights):
            pairs.append(Pair(scene_id, str(product), (0.1, 0.2, 0.6, 0.9)))
    test_scenes = sorted({p.scene_id for p in split_by_scene(pairs, seed=0).test})
    pairs += [Pair(scene_id, RANKING_COLD_PRODUCT, (0.2, 0.1, 0.8, 0.7)) for scene_id in test_scenes[:2]]
    write_pairs(root / "pairs.jsonl", pairs)
    (root / "categories.json").write_text(json.dumps(RANKING_CATEGORIES))
    return root


# ---------------------------------------------------------------- feature cache (tests/training/fit, cli)

FEATURE_SCENES = {"s1": (96, 128), "s2": (120, 80), "s3": (64, 64)}
FEATURE_PRODUCTS = {"p1": "Clothing|Tops", "p2": "Clothing|Tops", "p3": "Shoes|Boots", "p4": "Bags|Totes"}
FEATURE_PAIRS = [
    Pair("s1", "p1", (0.1, 0.1, 0.5, 0.6)),
    Pair("s1", "p3", (0.5, 0.55, 0.9, 0.95)),
    Pair("s2", "p2", (0.2, 0.2, 0.8, 0.8)),
    Pair("s2", "p4", (0.2, 0.2, 0.8, 0.8)),  # same crop as the line above: extracted once
    Pair("s3", "p3", (0.0, 0.0, 1.0, 1.0)),
]


def _noise_jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def write_feature_dataset(root: Path) -> STLDataset:
    """Three scenes of different sizes, four products, five pairs (two share a crop) for the feature cache tests."""
    for seed, (scene_id, size) in enumerate(FEATURE_SCENES.items()):
        _noise_jpeg(scene_path(root, scene_id), size, seed)
    for seed, product_id in enumerate(FEATURE_PRODUCTS, start=10):
        _noise_jpeg(product_path(root, product_id), (48, 64), seed)
    (root / "categories.json").write_text(json.dumps(FEATURE_PRODUCTS))
    write_pairs(root / "pairs.jsonl", FEATURE_PAIRS)
    return STLDataset.open(root)


# ---------------------------------------------------------------- product data (tests/index edit, update)

def write_product_data(root: Path) -> dict[str, dict[str, object]]:
    """A products.jsonl beside a tiny dataset's categories.json: every product with a title, price and stock,
    and a colour label on every other one. Returns the records by id."""
    product_ids = sorted(json.loads((root / "categories.json").read_text()))
    records: dict[str, dict[str, object]] = {}
    for number, product_id in enumerate(product_ids):
        record: dict[str, object] = {"id": product_id, "title": f"Product {product_id}", "price": 10.0 + number,
                                     "currency": "EUR", "in_stock": number % 3 != 0}
        if number % 2 == 0:
            record["labels"] = {"color": ["red", "blue"][number % 4 // 2]}
        records[product_id] = record
    (root / "products.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records.values()))
    return records


BOX_CATEGORIES = {"red": ("Apparel|Shoes", (220, 30, 30)), "blue": ("Apparel|Bags", (30, 40, 220))}


def write_synth_catalogue(root: Path, scenes: int, products: int, seed: int) -> Path:
    """The project's synthetic catalogue at `root`, through its CLI (one worker, no progress bars)."""
    code = synth.main(["--out", str(root), "--scenes", str(scenes), "--products", str(products), "--seed",
                       str(seed), "--workers", "1", "--no-progress"])
    assert code == 0, f"synth exited {code}"
    return root


def write_box_dataset(root: Path, scenes: int = 12, size: int = 64, seed: int = 0) -> Path:
    """STL-format scenes on a grey ground with a red square (Shoes) and a blue bar (Bags) each, boxed."""
    rng = np.random.default_rng(seed)
    (root / "images" / "scenes").mkdir(parents=True)
    (root / "images" / "products").mkdir(parents=True)
    categories = {}
    for name, (category, colour) in BOX_CATEGORIES.items():
        categories[name] = category
        Image.new("RGB", (24, 24), colour).save(root / "images" / "products" / f"{name}.jpg")
    lines = []
    for s in range(scenes):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        # red on the left half, blue on the right: never overlapping
        for name, x_range in (("red", (2, size // 2 - 22)), ("blue", (size // 2 + 2, size - 16))):
            width = int(rng.integers(16, 21)) if name == "red" else 12
            height = width if name == "red" else int(rng.integers(24, 33))
            x0 = int(rng.integers(*x_range))
            y0 = int(rng.integers(2, size - height - 2))
            draw.rectangle((x0, y0, x0 + width - 1, y0 + height - 1), fill=BOX_CATEGORIES[name][1])
            bbox = [x0 / size, y0 / size, (x0 + width) / size, (y0 + height) / size]
            lines.append(json.dumps({"scene": f"s{s:03d}", "product": name, "bbox": bbox}))
        image.save(root / "images" / "scenes" / f"s{s:03d}.jpg", quality=95)
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "categories.json").write_text(json.dumps(categories))
    return root


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Real uvicorn on an ephemeral loopback port (as tests/service/test_uvicorn.py); yields its base URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
        assert not thread.is_alive()
