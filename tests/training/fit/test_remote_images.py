"""Images read from URIs (a loopback HTTP server, file://) give the same features as local files."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import write_feature_dataset
from training.cli.features import main
from training.data.stl import STLDataset, is_uri, read_bytes
from training.exec.executor import ImageItem, decode_item
from training.fit.features import cache_features
from training.model.backbones import load_backbone
from training.model.embedder import Embedder

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[STLDataset, str]]:
    """The feature dataset on disk, and the URL of its images/ folder on a 127.0.0.1 HTTP server."""
    dataset = write_feature_dataset(tmp_path / "data")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(dataset.root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield dataset, f"http://127.0.0.1:{server.server_address[1]}/images"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(load_backbone("tiny"), context=0.1, device="cpu")


def test_locations_are_uris_under_the_images_base(served):
    dataset, url = served
    remote = STLDataset.open(dataset.root, images=url + "/")
    assert remote.product_location("p1") == f"{url}/products/p1.jpg"
    assert remote.scene_location("s2") == f"{url}/scenes/s2.jpg"
    assert dataset.product_location("p1") == str(dataset.root / "images" / "products" / "p1.jpg")
    assert is_uri(remote.product_location("p1")) and not is_uri(dataset.product_location("p1"))
    assert read_bytes(remote.product_location("p1")) == dataset.product_path("p1").read_bytes()
    assert read_bytes(f"file://{dataset.product_path('p2')}") == dataset.product_path("p2").read_bytes()


def test_features_from_http_equal_features_from_disk(served, embedder, tmp_path):
    dataset, url = served
    local = cache_features(dataset, embedder, tmp_path / "local", batch_size=2, workers=0, progress=False,
                           runtime="torch")
    remote_dataset = STLDataset.open(dataset.root, images=url)
    remote = cache_features(remote_dataset, embedder, tmp_path / "remote", batch_size=2, workers=2, progress=False,
                            runtime="torch")
    assert remote.computed == local.computed == 8
    np.testing.assert_allclose(remote.scene_features(dataset.pairs), local.scene_features(dataset.pairs), atol=1e-6)
    products = dataset.catalogue()
    np.testing.assert_allclose(remote.product_features(products), local.product_features(products), atol=1e-6)


def test_a_missing_remote_image_is_transient_and_a_broken_one_is_not(served, tmp_path):
    dataset, url = served
    (dataset.root / "images" / "products" / "broken.jpg").write_bytes(b"not a jpeg")
    preprocess = Embedder(load_backbone("tiny"), device="cpu").preprocess
    array, error, transient = decode_item(ImageItem(f"{url}/products/nothing.jpg"), preprocess)
    assert array is None and "FileNotFoundError" in error and transient  # retried next run, not recorded
    array, error, transient = decode_item(ImageItem(f"{url}/products/broken.jpg"), preprocess)
    assert array is None and error and not transient  # the bytes are bad: recorded, never retried
    array, error, _ = decode_item(ImageItem(f"{url}/scenes/s1.jpg", (0.1, 0.1, 0.5, 0.6)), preprocess)
    assert error is None and array.shape == (3, preprocess.image_size, preprocess.image_size)


def test_features_command_reads_images_from_a_url(served, tmp_path, capsys):
    dataset, url = served
    assert main(["--data", str(dataset.root), "--cache", str(tmp_path / "cache"), "--backbone", "tiny",
                 "--device", "cpu", "--workers", "0", "--no-progress", "--images", url, "--engine", "local"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["computed"] == 8 and printed["failed"] == 0 and printed["products"] == 4
