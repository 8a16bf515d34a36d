"""Build -> publish -> load round trip of the artifact, and the loader's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index.artifact import (
    ArtifactError,
    IndexMismatch,
    current_version,
    latest_version,
    list_versions,
    open_artifact,
)
from index.build import main as build_main
from training.data.split import split_by_scene
from training.data.stl import STLDataset
from training.model.checkpoint import load_embedder

from .conftest import CATEGORIES, make_checkpoint


def test_round_trip_keeps_every_product_and_finds_itself(artifacts: Path, dataset_dir: Path) -> None:
    artifact = open_artifact(artifacts)
    assert artifact.version == current_version(artifacts) == latest_version(artifacts)
    assert artifact.categories == CATEGORIES
    assert artifact.checkpoint_path.is_file()
    dataset = STLDataset.open(dataset_dir)
    indexes = artifact.load_indexes()
    assert {c: i.size for c, i in indexes.items()} == CATEGORIES
    # Product ids survive: every catalogue product sits in its own category's index, exactly once.
    for category, index in indexes.items():
        assert sorted(index.product_ids) == dataset.categories.products_in(category)
    # Querying with a product's own embedding (from a fresh embedder) returns it first with score ~1.
    embedder = load_embedder(artifact.checkpoint_path, "cpu")
    artifact.check_embedder(embedder.fingerprint())
    shoes = indexes["Apparel & Accessories|Shoes"]
    pid = shoes.product_ids[3]
    query = embedder.embed([embedder.load_image(dataset.product_path(pid))], None, "product")
    hits = shoes.search(query, 100)[0]
    assert len(hits) == shoes.size  # k capped at the index size
    assert hits[0][0] == pid and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)


def test_manifest_describes_the_build(artifacts: Path, checkpoint_path: Path) -> None:
    artifact = open_artifact(artifacts)
    manifest = artifact.manifest
    embedder = load_embedder(checkpoint_path, "cpu")
    assert manifest.embedder.to_dict() == embedder.fingerprint()
    assert manifest.embedder.backbone == "tiny" and manifest.embedder.dim == 16
    assert manifest.embedder.metric == "inner_product"
    assert manifest.product_count == sum(CATEGORIES.values())
    assert all(entry.kind == "exact" and entry.factory == "Flat" for entry in manifest.categories.values())
    products = artifact.products()
    assert {p["id"] for p in products} == {pid for c in manifest.categories for pid in artifact.read_ids(c)}
    assert all(p["image"] == f"images/products/{p['id']}.jpg" for p in products)
    assert artifact.verify_files() == []


def test_popularity_counts_only_training_pairs(artifacts: Path, dataset_dir: Path) -> None:
    dataset = STLDataset.open(dataset_dir)
    split = split_by_scene(dataset.pairs, (0.8, 0.1, 0.1), 0)
    popularity = open_artifact(artifacts).popularity
    for pid in dataset.categories.product_to_path:
        assert popularity.count(pid) == sum(p.product_id == pid for p in split.train)
    held_out_only = {p.product_id for p in split.val + split.test} - {p.product_id for p in split.train}
    assert all(popularity.count(pid) == 0 for pid in held_out_only)
    assert len(popularity.top("Shoes", 100)) == CATEGORIES["Apparel & Accessories|Shoes"]


def test_mismatched_embedder_is_refused(artifacts: Path, tmp_path: Path) -> None:
    artifact = open_artifact(artifacts)
    other = load_embedder(make_checkpoint(tmp_path / "other.pt", seed=1), "cpu")
    with pytest.raises(IndexMismatch, match="head_sha256"):
        artifact.check_embedder(other.fingerprint())
    changed = {**artifact.fingerprint(), "dim": 32, "backbone": "resnet50"}
    with pytest.raises(IndexMismatch, match="backbone.*dim|dim.*backbone"):
        artifact.check_embedder(changed)
    assert issubclass(IndexMismatch, ArtifactError)


def test_search_validates_queries(artifacts: Path) -> None:
    index = open_artifact(artifacts).load_indexes()["Apparel & Accessories|Shoes"]
    with pytest.raises(ValueError, match=r"shape \[n, 16\]"):
        index.search(np.zeros((1, 8), np.float32), 3)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.zeros((1, 16), np.float32), 0)
    assert len(index.search(np.ones((2, 16), np.float32), 3)) == 2


def test_no_artifact_or_corrupt_index_raises(tmp_path: Path, artifacts: Path) -> None:
    with pytest.raises(ArtifactError, match="no index version is published"):
        open_artifact(tmp_path / "empty")
    assert current_version(tmp_path / "empty") is None and latest_version(tmp_path / "empty") is None
    with pytest.raises(ArtifactError, match="does not exist"):
        open_artifact(artifacts, "19990101T000000.000000Z-deadbeef")
    real = current_version(artifacts)
    # Names that are not one directory of versions/: refused as such, never looked up (a path, or too long
    # to exist: the file system would raise ENAMETOOLONG)
    for name in ("", "..", f"../versions/{real}", f"{real}/", "a" * 300, "x\x00y"):
        with pytest.raises(ArtifactError, match="is not an index version name"):
            open_artifact(artifacts, name)
    artifact = open_artifact(artifacts)
    entry = artifact.manifest.categories["Apparel & Accessories|Shoes"]
    index_file = artifact.path / entry.index_file
    index_file.write_bytes(index_file.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="sha256 differs"):
        artifact.load_indexes()
    with pytest.raises(ArtifactError, match="corrupt index file"):
        artifact.load_indexes(verify_checksums=False)
    (artifact.path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        open_artifact(artifacts)


def test_build_cli_reports_bad_input(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    assert build_main(["--data", str(tmp_path / "nowhere"), "--checkpoint", str(checkpoint_path),
                       "--out", str(out), "--no-progress"]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert build_main(["--data", str(dataset_dir), "--checkpoint", str(tmp_path / "missing.pt"),
                       "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list_versions(out) == []
    json.loads((dataset_dir / "categories.json").read_text())  # fixture untouched


def test_build_from_feature_cache_matches_direct_embedding(tmp_path: Path, dataset_dir: Path,
                                                           checkpoint_path: Path, artifacts: Path) -> None:
    out = tmp_path / "cached"
    args = ["--data", str(dataset_dir), "--checkpoint", str(checkpoint_path), "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0", "--no-progress"]
    assert build_main(args) == 0
    assert any((tmp_path / "cache").iterdir())  # the cache was filled and reused by the build
    cached, direct = open_artifact(out), open_artifact(artifacts)
    for category in CATEGORIES:
        assert cached.read_ids(category) == direct.read_ids(category)
        np.testing.assert_allclose(cached.read_vectors(category), direct.read_vectors(category), atol=1e-5)


def test_concurrent_searches_agree_with_sequential_ones(artifacts: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    artifact = open_artifact(artifacts)
    index = artifact.load_indexes()["Apparel & Accessories|Shoes"]
    queries = artifact.read_vectors("Apparel & Accessories|Shoes")
    expected = [index.search(query, 5) for query in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda query: index.search(query, 5), list(queries) * 20))
    assert results == expected * 20
