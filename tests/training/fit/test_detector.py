"""The detector trains on cached pyramids of a tiny coloured-box dataset and finds the boxes it saw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures import write_box_dataset
from training.data.stl import STLDataset
from training.eval.detection import box_iou, scene_truths
from training.fit.detector import (
    DetectorFitOptions,
    PyramidCacheError,
    cache_pyramids,
    fit_detector,
    train_detector,
)
from training.model.backbones import load_backbone
from training.model.detector import Detector, DetectorNet, detection_preprocess, load_detector, pyramid_spec

OPTIONS = DetectorFitOptions(backbone="tiny", image_size=64, fpn_channels=32, head_convs=1, epochs=25,
                             batch_size=4, lr=1e-2, patience=25)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs on a shared 2-core machine: one thread is 6-10x faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def boxes(tmp_path_factory) -> Path:
    return write_box_dataset(tmp_path_factory.mktemp("boxes") / "data")


def test_cache_is_reused_and_checked(boxes: Path, tmp_path: Path) -> None:
    dataset = STLDataset.open(boxes)
    backbone = load_backbone("tiny")
    preprocess = detection_preprocess(backbone, 64)
    scenes = sorted({pair.scene_id for pair in dataset.pairs})
    first = cache_pyramids(dataset, scenes[:5], backbone, preprocess, tmp_path, device="cpu", workers=0,
                           progress=False)
    assert len(first) == 5
    full = cache_pyramids(dataset, scenes, backbone, preprocess, tmp_path, device="cpu", workers=0, progress=False)
    assert len(full) == len(scenes) and len(list(full.directory.glob("*.keys"))) == 2  # only the 7 new ones
    maps = full.maps([scenes[0]])
    assert [tuple(m.shape) for m in maps] == [(1, 16, 32, 32), (1, 32, 16, 16)]
    # the cached maps are the backbone's own (float16 rounding aside)
    detector = Detector(backbone, DetectorNet(pyramid_spec("tiny"), 2, OPTIONS.model_config()), ["a", "b"], "cpu",
                        freeze=False)
    direct = detector.pyramid_maps(detector.transform(Image.open(dataset.scene_path(scenes[0])).convert("RGB"))[None])
    for cached, fresh in zip(maps, direct, strict=True):
        torch.testing.assert_close(cached, fresh, atol=2e-2, rtol=1e-2)
    manifest = full.directory / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"image_size": 64', '"image_size": 48'))
    with pytest.raises(PyramidCacheError, match="another backbone or preprocessing"):
        cache_pyramids(dataset, scenes, backbone, preprocess, tmp_path, device="cpu", workers=0, progress=False)


def test_detector_finds_the_boxes_it_was_trained_on(boxes: Path, tmp_path: Path) -> None:
    dataset = STLDataset.open(boxes)
    backbone = load_backbone("tiny")
    preprocess = detection_preprocess(backbone, OPTIONS.image_size)
    truths = scene_truths(dataset, dataset.pairs)
    cache = cache_pyramids(dataset, [t.scene_id for t in truths], backbone, preprocess, tmp_path, device="cpu",
                           workers=0, progress=False)
    categories = dataset.categories.paths
    torch.manual_seed(0)  # the head's initial weights: the run is seeded end to end
    net = DetectorNet(pyramid_spec("tiny"), len(categories), OPTIONS.model_config())
    log = train_detector(net, cache, truths, [], categories, OPTIONS, torch.device("cpu"), progress=False)
    assert log[-1]["loss"] < log[0]["loss"] / 2
    detector = Detector(backbone, net, categories, "cpu")
    images = [Image.open(dataset.scene_path(t.scene_id)).convert("RGB") for t in truths]
    found, total = 0, 0
    for truth, detections in zip(truths, detector.detect(images, score_threshold=0.2), strict=True):
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        for box, category in zip(truth.boxes, truth.categories, strict=True):
            total += 1
            found += any(d.category == category and box_iou(box, d.bbox) > 0.5 for d in detections)
    assert found >= 0.8 * total, f"found {found} of {total} boxes"


def test_fit_detector_writes_a_checkpoint_that_loads(boxes: Path, tmp_path: Path) -> None:
    options = DetectorFitOptions(**{**OPTIONS.to_dict(), "epochs": 2})
    fitted = fit_detector(boxes, tmp_path / "run", options, cache=tmp_path / "cache", device="cpu", workers=0,
                          progress=False)
    assert fitted.path.is_file() and (tmp_path / "run" / "detector_log.json").is_file()
    assert len(fitted.log) == 2 and "test" in fitted.metrics and 0.0 <= fitted.metrics["test"]["map_50"] <= 1.0
    detector = load_detector(fitted.path, device="cpu")
    assert detector.categories == ["Apparel|Bags", "Apparel|Shoes"]
    assert detector.config == options.model_config()
