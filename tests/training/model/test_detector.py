"""Detector model: pyramid shapes, detections as a typed, sorted list, and the checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from training.errors import DataError
from training.model.backbones import load_backbone
from training.model.detector import (
    Detection,
    Detector,
    DetectorCheckpoint,
    DetectorConfig,
    DetectorMismatch,
    DetectorNet,
    build_pyramid,
    detection_preprocess,
    load_detector,
    pyramid_spec,
    save_detector,
)

CATEGORIES = ["Apparel|Bags", "Apparel|Shoes"]
CONFIG = DetectorConfig(image_size=64, fpn_channels=32, head_convs=1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs on a shared 2-core machine: one thread is several times faster than two that wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(seed: int = 0) -> DetectorNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DetectorNet(pyramid_spec("tiny"), len(CATEGORIES), CONFIG).eval()


def _save(path: Path, net: DetectorNet) -> Path:
    backbone = load_backbone("tiny")
    save_detector(path, DetectorCheckpoint(CONFIG, CATEGORIES, net.state_dict(), backbone.name,
                                           backbone.weights_sha256, detection_preprocess(backbone, 64),
                                           {"epochs": 1}, {"test": {"map_50": 0.5}}))
    return path


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (80, 64), (200, 20, 20)), Image.new("RGB", (64, 96), (20, 20, 200))]


def test_pyramid_is_the_backbone_own_modules() -> None:
    backbone = load_backbone("tiny")
    maps = build_pyramid(backbone)(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16)]
    assert not any(p.requires_grad for p in build_pyramid(backbone).parameters())
    assert pyramid_spec("efficientnet_lite0").strides == (8, 16, 32)
    with pytest.raises(DataError):
        pyramid_spec("no-such-backbone")


def test_detect_returns_sorted_normalised_detections_and_honours_thresholds() -> None:
    detector = Detector(load_backbone("tiny"), _net(), CATEGORIES, "cpu")
    results = detector.detect(_images(), score_threshold=0.0, max_detections=7)
    assert len(results) == 2 and all(len(r) == 7 for r in results)
    for detections in results:
        assert all(isinstance(d, Detection) and d.category in CATEGORIES for d in detections)
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)
        assert all(0.0 <= v <= 1.0 for d in detections for v in d.bbox)
        assert all(d.bbox[0] <= d.bbox[2] and d.bbox[1] <= d.bbox[3] for d in detections)
    assert detector.detect(_images(), score_threshold=1.0) == [[], []]
    assert detector.detect([]) == []


def test_checkpoint_round_trip_gives_the_same_detections(tmp_path: Path) -> None:
    net = _net(seed=3)
    path = _save(tmp_path / "detector.pt", net)
    loaded = load_detector(path, device="cpu")
    assert loaded.categories == CATEGORIES and loaded.config == CONFIG
    original = Detector(load_backbone("tiny"), net, CATEGORIES, "cpu")
    expected = original.detect(_images(), score_threshold=0.0, max_detections=5)
    got = loaded.detect(_images(), score_threshold=0.0, max_detections=5)
    for want, have in zip(expected, got, strict=True):
        assert [d.category for d in want] == [d.category for d in have]
        assert [d.score for d in want] == pytest.approx([d.score for d in have], abs=1e-5)


def test_a_detector_trained_before_reducing_gap_is_served_as_it_was_trained(tmp_path: Path) -> None:
    backbone = load_backbone("tiny")
    older = detection_preprocess(backbone, 64, reducing_gap=None)  # what checkpoints recorded before the option
    save_detector(tmp_path / "old.pt", DetectorCheckpoint(CONFIG, CATEGORIES, _net().state_dict(), backbone.name,
                                                          backbone.weights_sha256, older, {}, {}))
    assert load_detector(tmp_path / "old.pt", device="cpu").preprocess == older
    assert load_detector(_save(tmp_path / "new.pt", _net()), device="cpu").preprocess.reducing_gap == 2.0


def test_load_refuses_other_weights_and_foreign_files(tmp_path: Path) -> None:
    path = _save(tmp_path / "detector.pt", _net())
    other = tmp_path / "other-tiny.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.save({k: torch.randn_like(v) for k, v in load_backbone("tiny").model.state_dict().items()}, other)
    with pytest.raises(DetectorMismatch, match="other tiny weights"):
        load_detector(path, device="cpu", backbone_weights=other)
    foreign = tmp_path / "foreign.pt"
    torch.save({"format_version": 1, "state_dict": {}}, foreign)
    with pytest.raises(DetectorMismatch, match="not a detector checkpoint"):
        load_detector(foreign, device="cpu")
    with pytest.raises(DataError, match="does not exist"):
        load_detector(tmp_path / "absent.pt", device="cpu")


def test_config_is_validated_and_round_trips() -> None:
    assert DetectorConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(DataError):
        DetectorConfig(fpn_channels=40)
    with pytest.raises(DataError, match="multiple of 32"):  # GroupNorm(32, 48) would fail inside torchvision
        DetectorConfig(fpn_channels=48)
    with pytest.raises(DataError, match="between 32 and 2048"):  # 100,000 px asked torch for 240 GB (fuzzing)
        DetectorConfig(image_size=100_000)
    DetectorNet(pyramid_spec("tiny"), 2, DetectorConfig(image_size=64, fpn_channels=64, head_convs=1))
