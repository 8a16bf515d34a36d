"""The exported detector without torch: one photo through the static-batch graph answers what the
dynamic-batch graph answers for it, and the precision is chosen (and refused) as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.model.backbones import load_backbone
from training.model.detect_post import DetectorExportError, DetectorGraph, batched_nms
from training.model.detector import (
    Detector,
    DetectorCheckpoint,
    DetectorConfig,
    DetectorNet,
    detection_preprocess,
    export_detector,
    pyramid_spec,
    save_detector,
)
from training.model.runtimes import installed
from training.model.runtimes.openvino_runtime import cpu_supports_bf16

CATEGORIES = ["Apparel|Bags", "Apparel|Shoes"]
CONFIG = DetectorConfig(image_size=64, fpn_channels=32, head_convs=1)
needs_openvino = pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny detector, exported (the graph's speed and rounding do not depend on training)."""
    pytest.importorskip("onnx", reason="exporting needs the onnx package")
    base = tmp_path_factory.mktemp("detect-post")
    backbone = load_backbone("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = DetectorNet(pyramid_spec("tiny"), len(CATEGORIES), CONFIG).eval()
    checkpoint = base / "detector.pt"
    save_detector(checkpoint, DetectorCheckpoint(CONFIG, CATEGORIES, net.state_dict(), backbone.name,
                                                 backbone.weights_sha256, detection_preprocess(backbone, 64)))
    export_detector(Detector(backbone, net, CATEGORIES, "cpu"), checkpoint, base / "export")
    return base / "export"


def _batch(count: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1.0, 1.0, (count, 3, 64, 64)).astype(np.float32)


@needs_openvino
def test_one_photo_through_the_static_graph_matches_the_batched_graph(export_dir: Path) -> None:
    graph = DetectorGraph(export_dir, "openvino", threads=1, precision="f32")
    batch = _batch(3)
    together = graph.raw(batch)  # the dynamic-batch graph, compiled on this first batch of several
    for index in range(len(batch)):
        alone = graph.raw(batch[index:index + 1])  # the static graph of one
        for whole, single in zip(together, alone, strict=True):
            assert single.shape == (1, *whole.shape[1:])
            np.testing.assert_allclose(single[0], whole[index], rtol=1e-4, atol=1e-4)
    assert graph.description == "openvino (f32)"


@needs_openvino
def test_auto_precision_is_bf16_only_where_the_cpu_runs_it(export_dir: Path) -> None:
    graph = DetectorGraph(export_dir, "openvino", threads=1)
    assert graph.precision == ("bf16" if cpu_supports_bf16() else "f32")
    if not cpu_supports_bf16():
        with pytest.raises(DetectorExportError, match="bf16 needs a CPU"):
            DetectorGraph(export_dir, "openvino", precision="bf16")
        return
    exact = DetectorGraph(export_dir, "openvino", threads=1, precision="f32").raw(_batch(1))
    rounded = graph.raw(_batch(1))
    for want, got in zip(exact, rounded, strict=True):
        # bf16 keeps 8 bits of mantissa: close to f32, not equal to it
        assert np.max(np.abs(want - got)) < 0.05 * max(1.0, float(np.max(np.abs(want))))
        assert not np.array_equal(want, got)


@pytest.mark.skipif(not installed("onnxruntime"), reason="onnxruntime is not installed")
def test_onnxruntime_runs_f32_and_refuses_bf16(export_dir: Path) -> None:
    assert DetectorGraph(export_dir, "onnxruntime").precision == "f32"
    with pytest.raises(DetectorExportError, match="openvino only"):
        DetectorGraph(export_dir, "onnxruntime", precision="bf16")
    with pytest.raises(DetectorExportError, match="auto, f32 or bf16"):
        DetectorGraph(export_dir, "onnxruntime", precision="fp16")


def test_batched_nms_keeps_what_torchvision_keeps_and_stops_at_max_keep() -> None:
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(0, 300))
        corners = rng.uniform(0, 100, (count, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(1, 40, (count, 2))], axis=1).astype(np.float32)
        scores = rng.uniform(0, 1, count).astype(np.float32)
        labels = rng.integers(0, 4, count)
        threshold = float(rng.uniform(0.2, 0.8))
        expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                               torch.from_numpy(labels), threshold).numpy()
        np.testing.assert_array_equal(batched_nms(boxes, scores, labels, threshold), expected)
        np.testing.assert_array_equal(batched_nms(boxes, scores, labels, threshold, max_keep=5), expected[:5])
    assert batched_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), 0.5).size == 0
