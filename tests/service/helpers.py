"""Helpers of the service tests (a plain module: tests import it; conftest only holds the fixtures)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from index.build import build
from service.settings import Settings
from tests.fixtures import make_tiny_checkpoint, random_picture, write_tiny_dataset
from training.data.products import Product

SHOES = "Apparel & Accessories|Shoes"


BAGS = "Apparel & Accessories|Handbags"


PANTS = "Apparel & Accessories|Clothing|Pants"


CATEGORIES = {SHOES: 9, BAGS: 6, PANTS: 5}


draw = random_picture


def encode(image: Image.Image, image_format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def scene_jpeg(seed: int = 7, size: int = 96) -> bytes:
    return encode(draw(np.random.default_rng(seed), size), "JPEG", quality=90)


def make_dataset(root: Path, seed: int = 0) -> Path:
    return write_tiny_dataset(root, CATEGORIES, scenes=24, items_per_scene=3, seed=seed)


make_checkpoint = make_tiny_checkpoint


def build_version(data: Path, checkpoint: Path, root: Path, **options) -> str:
    # Vector dedup off: the tiny random head maps every picture to nearly one vector, so at the build's
    # threshold the whole category would be one group. Identical image files are still grouped.
    options = {"duplicate_threshold": 0.0, **options}
    return build(data, checkpoint, root, device="cpu", workers=0, progress=False, **options)


def make_settings(artifacts: Path, **overrides) -> Settings:
    values = {"artifacts": artifacts, "device": "cpu", "batch_max_wait_ms": 1.0, "torch_threads": 0,
              "admin_token": None, "checkpoint": None, "index_version": None,
              "background_load": False}
    return Settings(**{**values, **overrides})


def post(client: TestClient, image: bytes | None = None, category: str | None = "Shoes", **fields):
    data = {key: str(value) for key, value in fields.items() if value is not None}
    if category is not None:
        data["category"] = category
    files = {"image": ("scene.jpg", image if image is not None else scene_jpeg(), "image/jpeg")}
    return client.post("/recommend", data=data, files=files)


SHOP_CATEGORIES = {SHOES: 32, BAGS: 8}


SHOP_BRANDS = ("Acme", "Zenith", "Nova")


SHOP_COLOURS = ("red", "blue", "green", "dark blue", "black")


SHOP_STOCK = (True, True, False, None)  # a quarter out of stock, a quarter unknown (kept by the default)


SHOP_DUPLICATE = ("p0x004", "p0x005")  # the same picture file: the build puts them in one dedup group


def shop_products(product_ids: list[str]) -> list[Product]:
    """Product data for `product_ids`: brands, prices (some missing), stock, colour and size labels."""
    products = []
    for i, pid in enumerate(sorted(product_ids)):
        products.append(Product(
            id=pid, title=f"Item {pid}", brand=SHOP_BRANDS[i % 3],
            price=None if i % 7 == 0 else float(10 + (i * 13) % 90), currency="EUR",
            url=f"https://shop.example/{pid}", in_stock=SHOP_STOCK[i % 4],
            labels={"colour": (SHOP_COLOURS[i % 5],), "size": ("s", "m") if i % 2 else ("l",)},
        ))
    return products
