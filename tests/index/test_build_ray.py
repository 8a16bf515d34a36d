"""`index build --engine ray` (Ray in local mode, 2 CPUs): the same published indexes as the local engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.artifact import open_artifact
from index.build import build
from index.build import main as build_main
from tests.index.remote_images import published, serve_images

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from training.exec.ray_executor import RayExecutor  # noqa: E402  (needs ray)

pytestmark = pytest.mark.ray

# A third category above the exact threshold, so one Ray task also trains an IVF index.
OPTIONS = {"device": "cpu", "workers": 0, "progress": False, "runtime": "torch", "export": False,
           "duplicate_threshold": 0.0, "exact_threshold": 6}


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    with RayExecutor(num_cpus=2) as started:
        yield started


def _published(root: Path) -> dict[str, tuple[list[str], np.ndarray, str]]:
    artifact = open_artifact(root)
    return {category: (artifact.read_ids(category), artifact.read_vectors(category),
                       artifact.entry(category).factory) for category in artifact.categories}


def test_ray_build_publishes_the_local_builds_indexes(executor, dataset_dir, checkpoint_path, tmp_path):
    build(dataset_dir, checkpoint_path, tmp_path / "local", **OPTIONS)
    build(dataset_dir, checkpoint_path, tmp_path / "ray", executor=executor, **OPTIONS)
    local, remote = _published(tmp_path / "local"), _published(tmp_path / "ray")
    assert sorted(remote) == sorted(local) and len(local) == 3
    for category, (ids, vectors, factory) in local.items():
        ray_ids, ray_vectors, ray_factory = remote[category]
        assert ray_ids == ids  # same products, same order: same faiss row ids
        np.testing.assert_allclose(ray_vectors, vectors, atol=1e-5)
        assert ray_factory == factory
    assert {factory for _, _, factory in local.values()} == {"Flat", "IVF1,Flat"}
    artifact = open_artifact(tmp_path / "ray")
    assert artifact.manifest.provenance.embed_runtime == "ray:torch"
    for category in artifact.categories:  # the indexes the tasks built answer like the local ones
        query = local[category][1][:2]
        ray_rows = artifact.read_index(category).search(query, 3)[1]
        local_rows = open_artifact(tmp_path / "local").read_index(category).search(query, 3)[1]
        assert np.array_equal(ray_rows, local_rows)


def test_cli_takes_engine_and_ray_address(executor, dataset_dir, checkpoint_path, tmp_path):
    # RayExecutor joins the running (local) Ray instead of starting another: the address is not used then.
    assert build_main(["--data", str(dataset_dir), "--checkpoint", str(checkpoint_path), "--out",
                       str(tmp_path / "out"), "--device", "cpu", "--workers", "0", "--no-progress", "--runtime",
                       "torch", "--no-export", "--duplicate-threshold", "0", "--engine", "ray",
                       "--memory-budget", "1MB"]) == 0
    assert len(open_artifact(tmp_path / "out").categories) == 3


def test_ray_build_reads_the_images_from_a_uri(executor, dataset_dir, checkpoint_path, tmp_path):
    pytest.importorskip("aiohttp")
    options = {**OPTIONS, "examples": 3}
    build(dataset_dir, checkpoint_path, tmp_path / "local", **options)
    with serve_images(dataset_dir, tmp_path / "store") as (url, requests):
        build(dataset_dir, checkpoint_path, tmp_path / "ray", executor=executor, images=url, **options)
    local, remote = published(tmp_path / "local"), published(tmp_path / "ray")
    assert remote["ids"] == local["ids"] and remote["rows"] == local["rows"]  # order, thumbnails, groups
    for category, vectors in local["vectors"].items():
        np.testing.assert_allclose(remote["vectors"][category], vectors, atol=1e-5)
    assert remote["examples"] == local["examples"] and remote["fingerprint"] == local["fingerprint"]
    # Each product image is fetched twice: by a Ray actor to embed it, by the driver for its thumbnail.
    products = [pid for ids in local["ids"].values() for pid in ids]
    assert all(requests.get(f"/stl/products/{pid}.jpg", 0) >= 2 for pid in products)
