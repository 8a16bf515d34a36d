"""A tiny real artifact (tiny backbone, index.build) and helpers shared by the service tests."""

from __future__ import annotations

import io
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


def build_version(data: Path, checkpoint: Path, root: Path) -> str:
    return build(data, checkpoint, root, device="cpu", workers=0, progress=False)


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
