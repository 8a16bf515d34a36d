"""`train --engine ray` (Ray in local mode, 2 CPUs): the feature cache is the local engine's, the head trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import write_synth_catalogue
from training.cli import train
from training.data.stl import STLDataset
from training.fit.features import cache_features
from training.model.backbones import load_backbone
from training.model.checkpoint import load_checkpoint
from training.model.embedder import Embedder

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synth_catalogue(tmp_path_factory.mktemp("stl") / "tiny", scenes=40, products=24, seed=3)


def test_train_with_the_ray_engine_caches_the_local_features(tiny_data, tmp_path, capsys) -> None:
    argv = ["--data", str(tiny_data), "--out", str(tmp_path / "run"), "--backbone", "tiny", "--device", "cpu",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--cache", str(tmp_path / "ray"),
            "--engine", "ray"]
    assert train.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert not ray.is_initialized()  # the local Ray the job started stopped with it
    checkpoint = load_checkpoint(tmp_path / "run" / "head.pt")
    assert checkpoint.train_config.args["backbone"] == "tiny"

    dataset = STLDataset.open(tiny_data)
    embedder = Embedder(load_backbone("tiny"), context=0.1, device="cpu")
    # The Ray cache is complete: opening it with the local engine computes nothing more.
    remote = cache_features(dataset, embedder, tmp_path / "ray", workers=0, progress=False)
    local = cache_features(dataset, embedder, tmp_path / "local", workers=0, progress=False)
    assert remote.computed == 0 and local.computed == remote.n_scenes + remote.n_products > 0
    np.testing.assert_allclose(remote.scene_features(dataset.pairs), local.scene_features(dataset.pairs), atol=1e-5)
    products = dataset.catalogue()
    np.testing.assert_allclose(remote.product_features(products), local.product_features(products), atol=1e-5)
