"""A tiny real artifact (tiny backbone, index.build) and helpers shared by the service tests."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from index.artifact import current_version
from index.build import build
from service.app import create_app
from service.settings import Settings
from tests.fixtures import make_tiny_checkpoint, random_picture, write_tiny_dataset
from training.data.products import PRODUCTS_FILE, Product, write_products

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


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One dataset, two head checkpoints (seeds 0 and 1) and an artifact root with one version (seed 0)."""
    base = tmp_path_factory.mktemp("service")
    data = make_dataset(base / "data")
    head0 = make_checkpoint(base / "head0.pt", seed=0)
    head1 = make_checkpoint(base / "head1.pt", seed=1)
    root = base / "artifacts"
    build_version(data, head0, root)
    return {"data": data, "head0": head0, "head1": head1, "root": root}


@pytest.fixture
def artifacts(built: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the artifact root, for tests that publish versions or damage files."""
    root = tmp_path / "artifacts"
    shutil.copytree(built["root"], root, symlinks=True)
    assert current_version(root) is not None
    return root


@pytest.fixture(scope="module")
def client(built: dict[str, Path]) -> Iterator[TestClient]:
    """A running app on the shared (read-only) artifact."""
    with TestClient(create_app(make_settings(built["root"], max_upload_mb=0.25, max_image_pixels=1_000_000))) as app:
        yield app


def post(client: TestClient, image: bytes | None = None, category: str | None = "Shoes", **fields):
    data = {key: str(value) for key, value in fields.items() if value is not None}
    if category is not None:
        data["category"] = category
    files = {"image": ("scene.jpg", image if image is not None else scene_jpeg(), "image/jpeg")}
    return client.post("/recommend", data=data, files=files)


# ---------------------------------------------------------------- a shop: product data, duplicates, stock

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


@pytest.fixture(scope="session")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A dataset with products.jsonl and one duplicate picture, built by the real index build."""
    base = tmp_path_factory.mktemp("shop")
    data = write_tiny_dataset(base / "data", SHOP_CATEGORIES, scenes=16, items_per_scene=3, seed=3)
    first, second = (data / "images" / "products" / f"{pid}.jpg" for pid in SHOP_DUPLICATE)
    shutil.copyfile(first, second)
    categories = json.loads((data / "categories.json").read_text())
    products = shop_products(list(categories))
    write_products(data / PRODUCTS_FILE, products)
    root = base / "artifacts"
    build_version(data, make_checkpoint(base / "head.pt"), root)
    return {"data": data, "root": root, "products": {product.id: product for product in products},
            "categories": categories}


@pytest.fixture(scope="session")
def shop_client(shop: dict) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(shop["root"]))) as app:
        yield app
