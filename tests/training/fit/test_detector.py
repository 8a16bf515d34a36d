"""The detector trains on cached pyramids of a tiny coloured-box dataset and finds the boxes it saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

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

BOX_CATEGORIES = {"red": ("Apparel|Shoes", (220, 30, 30)), "blue": ("Apparel|Bags", (30, 40, 220))}


def write_box_dataset(root: Path, scenes: int = 12, size: int = 64, seed: int = 0) -> Path:
    """STL-format scenes on a grey ground with a red square (Shoes) and a blue bar (Bags) each, boxed."""
    rng = np.random.default_rng(seed)
    (root / "images" / "scenes").mkdir(parents=True)
    (root / "images" / "products").mkdir(parents=True)
    categories = {}
    for name, (category, colour) in BOX_CATEGORIES.items():
        categories[name] = category
        Image.new("RGB", (24, 24), colour).save(root / "images" / "products" / f"{name}.jpg")
    lines = []
    for s in range(scenes):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        # red on the left half, blue on the right: never overlapping
        for name, x_range in (("red", (2, size // 2 - 22)), ("blue", (size // 2 + 2, size - 16))):
            width = int(rng.integers(16, 21)) if name == "red" else 12
            height = width if name == "red" else int(rng.integers(24, 33))
            x0 = int(rng.integers(*x_range))
            y0 = int(rng.integers(2, size - height - 2))
            draw.rectangle((x0, y0, x0 + width - 1, y0 + height - 1), fill=BOX_CATEGORIES[name][1])
            bbox = [x0 / size, y0 / size, (x0 + width) / size, (y0 + height) / size]
            lines.append(json.dumps({"scene": f"s{s:03d}", "product": name, "bbox": bbox}))
        image.save(root / "images" / "scenes" / f"s{s:03d}.jpg", quality=95)
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "categories.json").write_text(json.dumps(categories))
    return root


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
