"""Feature cache: equal to direct extraction, incremental, keyed by preprocessing, resumable."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures import FEATURE_PRODUCTS as PRODUCTS
from tests.fixtures import write_feature_dataset as make_dataset
from training.data.stl import Pair, STLDataset
from training.fit import features as features_module
from training.fit.features import (
    CachedFeatures,
    FeatureCacheError,
    MissingFeatures,
    cache_dir,
    cache_features,
    scene_key,
)
from training.model.backbones import load_backbone
from training.model.batch_runtime import FEATURE_TOLERANCE
from training.model.embedder import Embedder
from training.model.preprocess import load_image


@pytest.fixture()
def dataset(tmp_path) -> STLDataset:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(load_backbone("tiny"), context=0.1, device="cpu")


def _direct(embedder: Embedder, dataset: STLDataset, pairs, products) -> tuple[np.ndarray, np.ndarray]:
    scenes = torch.stack([embedder.transform(load_image(dataset.scene_path(p.scene_id)), p.bbox) for p in pairs])
    items = torch.stack([embedder.transform(load_image(dataset.product_path(pid))) for pid in products])
    return embedder.backbone_features(scenes).numpy(), embedder.backbone_features(items).numpy()


def test_scene_key_rounds_bbox_to_six_decimals():
    assert scene_key(Pair("abc", "p", (0.1, 0.2, 0.30000001, 1.0))) == "abc@0.100000,0.200000,0.300000,1.000000"
    assert scene_key(Pair("abc", "p", (0.1, 0.2, 0.3, 1.0))) == scene_key(Pair("abc", "q", (0.1, 0.2, 0.3, 1.0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_features_equal_direct_extraction(dataset, embedder, tmp_path, workers):
    cached = cache_features(dataset, embedder, tmp_path / "cache", batch_size=2, workers=workers, progress=False)
    products = dataset.catalogue()
    scene_expected, product_expected = _direct(embedder, dataset, dataset.pairs, products)
    scenes = cached.scene_features(dataset.pairs)
    assert scenes.dtype == np.float32 and scenes.shape == (5, 32)
    np.testing.assert_allclose(scenes, scene_expected, atol=1e-5)
    np.testing.assert_allclose(cached.product_features(products), product_expected, atol=1e-5)
    # order follows the request, not the cache
    np.testing.assert_allclose(cached.product_features(["p4", "p1"]), product_expected[[3, 0]], atol=1e-5)
    assert cached.computed == 4 + 4  # 4 distinct scene crops (one shared by two pairs) + 4 products
    assert cached.n_scenes == 4 and cached.n_products == 4
    assert cached.directory == cache_dir(tmp_path / "cache", embedder)
    assert cached.directory.name.startswith(f"tiny-{embedder.backbone.weights_sha256[:12]}-")


def test_second_call_is_a_full_hit(dataset, embedder, tmp_path):
    first = cache_features(dataset, embedder, tmp_path / "cache", batch_size=3, workers=0, progress=False)
    second = cache_features(dataset, embedder, tmp_path / "cache", batch_size=3, workers=0, progress=False)
    assert first.computed == 8 and second.computed == 0
    assert np.array_equal(first.scene_features(dataset.pairs), second.scene_features(dataset.pairs))
    assert np.array_equal(first.product_features(["p1", "p2"]), second.product_features(["p1", "p2"]))
    reopened = CachedFeatures.open(first.directory)
    assert np.array_equal(reopened.product_features(["p3"]), first.product_features(["p3"]))
    manifest = json.loads((first.directory / "manifest.json").read_text())
    assert manifest["backbone"] == "tiny" and manifest["dim"] == 32
    assert manifest["counts"] == {"scene": 4, "product": 4}


def test_adding_a_product_computes_only_that_one(dataset, embedder, tmp_path):
    cache_features(dataset, embedder, tmp_path / "cache", products=["p1", "p2", "p3"], workers=0, progress=False)
    cached = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)
    assert cached.computed == 1
    _, expected = _direct(embedder, dataset, dataset.pairs, ["p4"])
    np.testing.assert_allclose(cached.product_features(["p4"]), expected, atol=1e-5)
    assert cached.n_products == 4


def test_other_context_or_preprocessing_gets_another_directory(dataset, embedder, tmp_path):
    tiny = embedder.backbone
    base = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)
    wider = cache_features(dataset, Embedder(tiny, context=0.3, device="cpu"), tmp_path / "cache", workers=0,
                           progress=False)
    drafted = Embedder(tiny, context=0.1, device="cpu", jpeg_draft=True)
    assert len({base.directory, wider.directory, cache_dir(tmp_path / "cache", drafted)}) == 3
    assert wider.computed == 8  # nothing reused across preprocessing
    # context changes scene crops (but not whole-image products)
    assert not np.allclose(base.scene_features(dataset.pairs[:1]), wider.scene_features(dataset.pairs[:1]))
    np.testing.assert_allclose(base.product_features(["p1"]), wider.product_features(["p1"]), atol=1e-6)


def test_manifest_of_another_embedder_is_refused(dataset, embedder, tmp_path):
    cached = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)
    manifest = json.loads((cached.directory / "manifest.json").read_text())
    manifest["backbone_weights_sha256"] = "0" * 64
    (cached.directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match="backbone_weights_sha256"):
        cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)


@pytest.mark.parametrize("content", [b"[]", b'"manifest"', b'{"backbone": "tiny\xff"}'])
def test_manifest_that_is_not_an_object_is_corrupt(dataset, embedder, tmp_path, content):
    # The fuzzer's case: valid JSON but not an object was an AttributeError (list has no .get).
    directory = cache_dir(tmp_path / "cache", embedder)
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_bytes(content)
    with pytest.raises(FeatureCacheError, match=r"manifest\.json is corrupt .*; delete .* and extract again"):
        cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)


def test_interrupted_run_resumes_to_the_same_result(dataset, embedder, tmp_path, monkeypatch):
    reference = cache_features(dataset, embedder, tmp_path / "reference", batch_size=3, workers=0, progress=False)

    real = features_module._SegmentWriter.append
    calls = {"n": 0}

    def crash_after_first_chunk(self, keys, features):
        # Whatever runtime computed them, the second chunk's rows never reach the disk.
        calls["n"] += bool(keys)
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, keys, features)

    monkeypatch.setattr(features_module._SegmentWriter, "append", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        cache_features(dataset, embedder, tmp_path / "cache", batch_size=3, workers=0, progress=False)
    monkeypatch.setattr(features_module._SegmentWriter, "append", real)

    partial = CachedFeatures.open(cache_dir(tmp_path / "cache", embedder))
    assert partial.n_scenes == 3 and partial.n_products == 0  # exactly the first chunk survived
    resumed = cache_features(dataset, embedder, tmp_path / "cache", batch_size=3, workers=0, progress=False)
    assert resumed.computed == 8 - 3
    assert np.array_equal(resumed.scene_features(dataset.pairs), reference.scene_features(dataset.pairs))
    products = dataset.catalogue()
    assert np.array_equal(resumed.product_features(products), reference.product_features(products))


def test_torn_keys_line_is_not_committed(dataset, embedder, tmp_path):
    cached = cache_features(dataset, embedder, tmp_path / "cache", products=[], workers=0, progress=False)
    keys_file = next(cached.directory.glob("scene-*.keys"))
    with keys_file.open("a") as out:
        out.write("s9@0.0")  # a kill in the middle of appending a key
    again = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)
    assert again.computed == 4 and again.n_scenes == 4 and not again.has_scene(Pair("s9", "p", (0, 0, 1, 1)))


def test_many_segments_are_merged(dataset, embedder, tmp_path, monkeypatch):
    monkeypatch.setattr(features_module, "MAX_SEGMENTS", 2)
    for count in range(1, 5):
        cached = cache_features(dataset, embedder, tmp_path / "cache", pairs=[], products=list(PRODUCTS)[:count],
                                workers=0, progress=False)
    cached = cache_features(dataset, embedder, tmp_path / "cache", pairs=[], workers=0, progress=False)
    assert cached.computed == 0
    assert len(list(cached.directory.glob("product-*.npy"))) <= 2
    _, expected = _direct(embedder, dataset, dataset.pairs[:1], list(PRODUCTS))
    np.testing.assert_allclose(cached.product_features(list(PRODUCTS)), expected, atol=1e-5)


def test_unreadable_image_is_recorded_and_not_retried(dataset, embedder, tmp_path):
    dataset.product_path("p2").write_bytes(b"\xff\xd8 broken jpeg")
    cached = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False)
    assert cached.computed == 7 and not cached.has_product("p2") and cached.has_product("p1")
    assert "p2" in cached.failed_products
    with pytest.raises(MissingFeatures, match="p2.*extraction failed"):
        cached.product_features(["p1", "p2"])
    assert cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False).computed == 0


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_an_exported_runtime_fills_the_same_cache_within_tolerance(dataset, embedder, tmp_path, runtime):
    """The runtime is not part of the cache key: its features equal torch's within FEATURE_TOLERANCE, so a
    cache started in torch and finished in OpenVINO (or the other way) is one cache."""
    torch_cache = cache_features(dataset, embedder, tmp_path / "cache", pairs=[], products=["p1", "p2"], workers=0,
                                 progress=False, runtime="torch")
    mixed = cache_features(dataset, embedder, tmp_path / "cache", workers=0, progress=False, runtime=runtime)
    assert mixed.directory == torch_cache.directory and mixed.computed == 4 + 2
    reference = cache_features(dataset, embedder, tmp_path / "reference", workers=0, progress=False, runtime="torch")
    products = dataset.catalogue()
    scale = max(1.0, float(np.abs(reference.product_features(products)).max()))
    assert np.abs(mixed.product_features(products) - reference.product_features(products)).max() <= (
        FEATURE_TOLERANCE * scale)
    assert np.abs(mixed.scene_features(dataset.pairs) - reference.scene_features(dataset.pairs)).max() <= (
        FEATURE_TOLERANCE * scale)
