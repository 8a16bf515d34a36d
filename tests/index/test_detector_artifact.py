"""The item detector in a version: exported at build time, covered by the manifest, checked by verify,
carried over by edits, and its torch-free decoding the same as `Detector.detect`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import build as build_cli
from index import verify as verify_cli
from index.artifact import open_artifact
from index.build import build
from index.errors import Refused
from index.manifest import MANIFEST_FILE, Manifest, read_manifest
from index.remove import remove_products
from index.verify import verify
from tests.fixtures import make_tiny_checkpoint
from tests.index.detection import BAGS, SHOES, scene_bytes, train_tiny_detector, truth, write_box_shop
from training.model.detect_post import GRAPH_FILE, DetectorGraph, box_iou
from training.model.detector import load_detector


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("detector-artifact")
    data = write_box_shop(base / "data")
    detector = train_tiny_detector(data, base / "detector")
    head = make_tiny_checkpoint(base / "head.pt")
    root = base / "artifacts"
    build(data, head, root, device="cpu", workers=0, progress=False, duplicate_threshold=0.0, detector=detector)
    return {"data": data, "detector": detector, "head": head, "root": root}


def _scenes(data: Path) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted((data / "images" / "scenes").glob("*.jpg"))]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_numpy_decoding_of_the_export_gives_torchs_detections(shop: dict[str, Path], runtime: str) -> None:
    torch_detector = load_detector(shop["detector"], "cpu")
    # f32: torch's precision (`auto` would run bf16 on a CPU with AMX, whose scores differ by ~1e-3)
    graph = DetectorGraph(open_artifact(shop["root"]).detector_dir, runtime, precision="f32")
    images = _scenes(shop["data"])
    expected = torch_detector.detect(images, 0.05, 0.6, 20)
    got = graph.detect(images, 0.05, 0.6, 20)
    compared = 0
    for want, have in zip(expected, got, strict=True):
        assert len(want) == len(have) > 0
        for a, b in zip(want, have, strict=True):
            assert a.category == b.category
            assert abs(a.score - b.score) < 1e-3
            assert box_iou(np.array([a.bbox]), np.array([b.bbox]))[0, 0] > 0.99
            compared += 1
    assert compared >= 2 * len(images)


def test_the_detector_finds_each_item_of_a_scene(shop: dict[str, Path]) -> None:
    graph = DetectorGraph(open_artifact(shop["root"]).detector_dir)
    for scene in ("s000", "s005", "s011"):
        found = graph.detect([Image.open(io.BytesIO(scene_bytes(shop["data"], scene))).convert("RGB")], 0.3, 0.3, 5)[0]
        for category, box in truth(shop["data"], scene).items():
            best = next(item for item in found if item.category == category)
            assert box_iou(np.array([best.bbox]), np.array([box]))[0, 0] > 0.5, (scene, category)


def test_the_manifest_records_the_detector_and_verify_checks_it(shop: dict[str, Path], tmp_path: Path) -> None:
    artifact = open_artifact(shop["root"])
    record = artifact.manifest.detector
    assert record is not None and record.folder == "detector"
    assert set(record.categories) == {SHOES, BAGS} and record.image_size == 64
    assert record.max_abs_diff is not None and record.max_abs_diff < 1e-3
    assert set(record.files) == {"detector.pt", GRAPH_FILE, "detector.json"}
    assert verify(shop["root"]).ok
    root = tmp_path / "artifacts"
    shutil.copytree(shop["root"], root, symlinks=True)
    graph = open_artifact(root).detector_dir / GRAPH_FILE
    graph.write_bytes(graph.read_bytes()[:-10])
    problems = verify(root).problems
    assert any("detector/detector.onnx" in problem for problem in problems)
    assert verify_cli.main([str(root)]) == 1


def test_a_manifest_without_a_detector_still_loads(shop: dict[str, Path]) -> None:
    path = open_artifact(shop["root"]).path / MANIFEST_FILE
    raw = json.loads(path.read_text())
    raw.pop("detector")
    assert Manifest.from_dict(raw).detector is None
    assert read_manifest(path).detector is not None


def test_an_edit_carries_the_detector_over(shop: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    shutil.copytree(shop["root"], root, symlinks=True)
    parent = open_artifact(root).manifest.detector
    remove_products(root, ["red3"])
    child = open_artifact(root)
    assert child.manifest.provenance.parent_version is not None
    assert child.manifest.detector == parent
    assert verify(root).ok


def test_build_refuses_a_detector_that_is_not_one(shop: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def embed_catalogue(*args: object, **kwargs: object) -> None:
        raise AssertionError("the catalogue was embedded before the detector was refused")

    # Refused before the embedding: a wrong --detector must not cost the whole catalogue's forward passes.
    monkeypatch.setattr("index.build.embed_catalogue", embed_catalogue)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Refused, match="not a readable detector checkpoint"):
        build(shop["data"], shop["head"], tmp_path / "junk", device="cpu", workers=0, progress=False,
              detector=tmp_path / "junk.pt")
    with pytest.raises(Refused, match="detector"):
        build(shop["data"], shop["head"], tmp_path / "artifacts", device="cpu", workers=0, progress=False,
              detector=shop["head"])  # a head checkpoint, not a detector
    assert build_cli.main(["--data", str(shop["data"]), "--checkpoint", str(shop["head"]), "--out",
                           str(tmp_path / "cli"), "--device", "cpu", "--workers", "0", "--no-progress",
                           "--detector", str(tmp_path / "missing.pt")]) != 0
