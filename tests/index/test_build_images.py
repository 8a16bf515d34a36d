"""`index build --images URI`: every image the build reads (embedding, thumbnails, dedup digests, example
scenes) comes through the one reader, so a build from a loopback HTTP server publishes what the local build does."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from index.build import build, catalogue_fingerprint
from index.build import main as build_main
from tests.index.conftest import make_dataset
from tests.index.remote_images import published, serve_images
from training.data.stl import STLDataset

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

OPTIONS = {"device": "cpu", "workers": 0, "progress": False, "runtime": "torch", "export": False, "examples": 4}


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    """The tiny dataset with one product image listed twice (the same bytes: one dedup group)."""
    root = make_dataset(tmp_path / "data")
    products = root / "images" / "products"
    shutil.copyfile(products / "p1x001.jpg", products / "p1x000.jpg")
    return root


def test_a_build_from_http_publishes_what_the_local_build_does(tmp_path, data, checkpoint_path):
    build(data, checkpoint_path, tmp_path / "local", **OPTIONS)
    local = published(tmp_path / "local")
    with serve_images(data, tmp_path / "store") as (url, requests):
        assert build_main(["--data", str(data), "--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "http"),
                           "--device", "cpu", "--workers", "2", "--no-progress", "--runtime", "torch", "--no-export",
                           "--images", url]) == 0
        served = dict(requests)
    remote = published(tmp_path / "http")

    assert remote["ids"] == local["ids"] and sum(map(len, local["ids"].values())) == 21  # same rows, same order
    for category, vectors in local["vectors"].items():
        np.testing.assert_allclose(remote["vectors"][category], vectors, atol=1e-6)
    assert remote["rows"] == local["rows"]  # thumbnails byte for byte, the same dedup groups
    groups = {row[0]: row[3] for row in local["rows"]}
    assert groups["p1x000"] == groups["p1x001"] and all(row[4] for row in local["rows"])
    assert remote["examples"] == local["examples"] and local["examples"]
    assert remote["fingerprint"] == local["fingerprint"] and remote["skipped"] == local["skipped"] == []
    assert local["images"]["p0x000"] == "images/products/p0x000.jpg"
    assert remote["images"]["p0x000"] == f"{url}/products/p0x000.jpg"
    # Every product and every example scene came over HTTP (scenes are read for the examples only).
    assert {f"/stl/products/{pid}.jpg" for pid in groups} <= set(served)
    example_scenes = {f"/stl/scenes/{example.scene_id}.jpg" for example, _ in local["examples"]}
    assert {path for path in served if path.startswith("/stl/scenes/")} == example_scenes


def test_the_catalogue_fingerprint_is_the_images_content_wherever_they_are(tmp_path, data):
    dataset = STLDataset.open(data)
    catalogue = dataset.catalogue()
    local = catalogue_fingerprint(dataset, catalogue)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data / "images", moved)
    assert catalogue_fingerprint(STLDataset.open(data, images=f"file://{moved}"), catalogue) == local
    assert catalogue_fingerprint(STLDataset.open(data, images=str(moved)), catalogue) == local
    (moved / "products" / "p0x000.jpg").unlink()  # unreadable there: a different catalogue
    assert catalogue_fingerprint(STLDataset.open(data, images=str(moved)), catalogue) != local
