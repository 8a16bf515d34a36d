"""Fixtures of the service tests: a tiny real artifact (tiny backbone, index.build); helpers live in helpers.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from index.artifact import current_version
from service.app import create_app
from tests.fixtures import write_tiny_dataset
from tests.service.helpers import (
    SHOP_CATEGORIES,
    SHOP_DUPLICATE,
    build_version,
    make_checkpoint,
    make_dataset,
    make_settings,
    shop_products,
)
from training.data.products import PRODUCTS_FILE, write_products


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
