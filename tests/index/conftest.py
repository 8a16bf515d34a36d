"""Tiny synthetic STL datasets and a tiny-backbone head checkpoint for the index tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from index.build import build
from tests.fixtures import make_tiny_checkpoint, save_picture, write_tiny_dataset

CATEGORIES = {
    "Apparel & Accessories|Shoes": 9,
    "Apparel & Accessories|Clothing|Pants": 7,
    "Apparel & Accessories|Handbags, Wallets & Cases": 5,
}


draw_image = save_picture


def make_dataset(root: Path, categories: dict[str, int] = CATEGORIES, scenes: int = 12, seed: int = 0) -> Path:
    return write_tiny_dataset(root, categories, scenes, items_per_scene=2, seed=seed)


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
