"""COCO mAP (pycocotools) on hand-made predictions, box matching, and the end-to-end hit rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import make_tiny_checkpoint, write_box_dataset
from training.data.stl import STLDataset
from training.eval.detection import SceneTruth, box_iou, coco_map, end_to_end, matching_detection, scene_truths
from training.model.checkpoint import load_embedder
from training.model.detector import Detection
from training.model.preprocess import load_image

SHOES, BAGS = "Apparel|Shoes", "Apparel|Bags"
TRUTHS = [
    SceneTruth("a", 200, 100, ((0.1, 0.1, 0.4, 0.5), (0.6, 0.2, 0.9, 0.9)), (SHOES, BAGS)),
    SceneTruth("b", 200, 100, ((0.2, 0.3, 0.5, 0.8),), (SHOES,)),
]


def _perfect(score: float = 0.9) -> list[list[Detection]]:
    return [[Detection(box, category, score) for box, category in zip(t.boxes, t.categories, strict=True)]
            for t in TRUTHS]


def _shift(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def test_perfect_predictions_score_one() -> None:
    metrics = coco_map(TRUTHS, _perfect())
    assert metrics.map_50 == pytest.approx(1.0) and metrics.map_50_95 == pytest.approx(1.0)
    assert metrics.per_category[SHOES] == {"ap_50": pytest.approx(1.0), "ap_50_95": pytest.approx(1.0), "boxes": 2}
    assert metrics.scenes == 2


def test_shifted_boxes_score_lower_and_strict_ious_lowest() -> None:
    # shifted by 10% of the box width: IoU ~0.82, above 0.5 but below the stricter thresholds
    shifted = [[Detection(_shift(d.bbox, 0.1 * (d.bbox[2] - d.bbox[0])), d.category, d.score) for d in scene]
               for scene in _perfect()]
    metrics = coco_map(TRUTHS, shifted)
    assert metrics.map_50 == pytest.approx(1.0)
    assert 0.3 < metrics.map_50_95 < 0.9
    far = [[Detection(_shift(d.bbox, 0.6 * (d.bbox[2] - d.bbox[0])), d.category, d.score) for d in scene]
           for scene in _perfect()]
    assert coco_map(TRUTHS, far).map_50 == pytest.approx(0.0)


def test_wrong_category_misses_and_empty_predictions_are_zero() -> None:
    swapped = [[Detection(d.bbox, BAGS if d.category == SHOES else SHOES, d.score) for d in scene]
               for scene in _perfect()]
    assert coco_map(TRUTHS, swapped).map_50 == pytest.approx(0.0)
    nothing = coco_map(TRUTHS, [[], []])
    assert nothing.map_50 == 0.0 and nothing.per_category[BAGS]["ap_50"] == 0.0
    # a category with no ground truth has no AP rather than a zero
    extra = coco_map(TRUTHS, _perfect(), categories=[SHOES, BAGS, "Apparel|Hats"])
    assert extra.per_category["Apparel|Hats"]["ap_50"] is None and extra.map_50 == pytest.approx(1.0)


def test_a_false_positive_ranked_first_lowers_ap() -> None:
    predictions = _perfect(0.5)
    predictions[1].append(Detection((0.6, 0.0, 0.7, 0.1), SHOES, 0.99))  # confident and wrong
    metrics = coco_map(TRUTHS, predictions)
    assert metrics.per_category[SHOES]["ap_50"] < 1.0 and metrics.per_category[BAGS]["ap_50"] == pytest.approx(1.0)


def test_box_iou_and_matching() -> None:
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 1), (0.5, 0, 1, 1)) == 0.0
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
    detections = [Detection((0.0, 0.0, 0.5, 0.5), SHOES, 0.4), Detection((0.0, 0.0, 0.45, 0.5), SHOES, 0.8),
                  Detection((0.0, 0.0, 0.5, 0.5), BAGS, 0.9)]
    assert matching_detection((0.0, 0.0, 0.5, 0.5), SHOES, detections).score == 0.8
    assert matching_detection((0.6, 0.6, 0.9, 0.9), SHOES, detections) is None


def test_end_to_end_with_given_boxes_as_detections_matches_the_given_hit_rate(tmp_path: Path) -> None:
    dataset = STLDataset.open(write_box_dataset(tmp_path / "data", scenes=4))
    embedder = load_embedder(make_tiny_checkpoint(tmp_path / "head.pt"), device="cpu")
    vectors = {category: embedder.embed([load_image(dataset.product_path(p))
                                         for p in sorted(dataset.categories.products_in(category))], None, "product")
               for category in dataset.categories.paths}
    truths = scene_truths(dataset, dataset.pairs)
    detected = {t.scene_id: [Detection(b, c, 0.9) for b, c in zip(t.boxes, t.categories, strict=True)]
                for t in truths}
    result = end_to_end(dataset, dataset.pairs, detected, embedder, vectors, k=1)
    assert result.items == 8 and result.found == 8
    assert result.hr_given == 1.0 and result.hr_detected == result.hr_given and result.ratio == 1.0  # 1 product each
    none = end_to_end(dataset, dataset.pairs, {}, embedder, vectors, k=1)
    assert none.found == 0 and none.hr_detected == 0.0 and none.to_dict()["recall"] == 0.0
    assert np.isfinite(none.hr_given)
