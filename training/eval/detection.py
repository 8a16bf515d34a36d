"""Detector evaluation: COCO mAP per category (pycocotools) and the end-to-end shop-the-look hit rate.

- `coco_map(truths, predictions)`: mAP@0.5 and mAP@0.5:0.95 overall and per category, computed by
  pycocotools' COCOeval (the reference implementation) on boxes in the scenes' own pixels.
- `end_to_end(...)`: the share of test items for which a detected box (IoU >= 0.5, right category) has the
  true product in its top K when embedded by a retrieval head and ranked over all products of the category,
  next to the same HR@K with the given boxes. An item with no such detection is a miss.
- `evaluate_detector(...)`: both on the test split (split_by_scene, the retrieval commands' seed and
  fractions), run through the real inference path (`Detector.detect` on decoded scene images).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.split import SPLIT_FRACTIONS, split_by_scene
from training.data.stl import BBox, Pair, STLDataset
from training.errors import DataError, Unavailable
from training.eval.metrics import hit_rate_at_k, positive_ranks
from training.fit.features import cache_features
from training.io import write_json_atomic
from training.model.checkpoint import load_embedder
from training.model.detector import Detection, load_detector
from training.model.embedder import Embedder
from training.model.preprocess import load_image

LOG = logging.getLogger(__name__)

MATCH_IOU = 0.5
NOT_FOUND = np.iinfo(np.int64).max  # the rank of an item no detection matched: never in any top K


@dataclass(frozen=True)
class SceneTruth:
    """The boxed items of one scene (only the boxed ones: STL labels are partial)."""

    scene_id: str
    width: int
    height: int
    boxes: tuple[BBox, ...]  # normalised
    categories: tuple[str, ...]  # full paths, one per box


@dataclass
class DetectionMetrics:
    map_50: float
    map_50_95: float
    per_category: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    scenes: int = 0

    def to_dict(self) -> dict:
        return {"map_50": self.map_50, "map_50_95": self.map_50_95, "scenes": self.scenes,
                "per_category": self.per_category}


def scene_truths(dataset: STLDataset, pairs: Sequence[Pair]) -> list[SceneTruth]:
    """Ground truth per scene in first-seen order; the same box and category listed twice counts once."""
    grouped: dict[str, dict[tuple, tuple[BBox, str]]] = {}
    for pair in pairs:
        category = dataset.categories.of(pair.product_id)
        key = (tuple(round(value, 6) for value in pair.bbox), category)
        grouped.setdefault(pair.scene_id, {})[key] = (pair.bbox, category)
    truths = []
    for scene_id, items in grouped.items():
        with Image.open(dataset.scene_path(scene_id)) as image:  # reads the header only
            width, height = image.size
        truths.append(SceneTruth(scene_id, width, height, tuple(box for box, _ in items.values()),
                                 tuple(category for _, category in items.values())))
    return truths


def _coco_box(box: BBox, width: int, height: int) -> list[float]:
    left, top, right, bottom = box
    return [left * width, top * height, (right - left) * width, (bottom - top) * height]


def coco_map(truths: Sequence[SceneTruth], predictions: Sequence[Sequence[Detection]],
             categories: Sequence[str] | None = None) -> DetectionMetrics:
    """COCO mAP of `predictions[i]` against `truths[i]`; per category AP@0.5, AP@0.5:0.95 and box count."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # an optional dependency of the detector only
        raise Unavailable("detector evaluation needs pycocotools (pip install pycocotools)") from exc
    if len(truths) != len(predictions):
        raise DataError(f"{len(truths)} scenes of ground truth but {len(predictions)} of predictions")
    names = sorted(set(categories) if categories is not None
                   else {c for truth in truths for c in truth.categories})
    category_id = {name: number for number, name in enumerate(names, start=1)}
    images, annotations, results = [], [], []
    for image_id, (truth, detections) in enumerate(zip(truths, predictions, strict=True), start=1):
        images.append({"id": image_id, "width": truth.width, "height": truth.height})
        for box, category in zip(truth.boxes, truth.categories, strict=True):
            coco_box = _coco_box(box, truth.width, truth.height)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id[category],
                                "bbox": coco_box, "area": coco_box[2] * coco_box[3], "iscrowd": 0})
        for detection in detections:
            if detection.category in category_id:
                results.append({"image_id": image_id, "category_id": category_id[detection.category],
                                "bbox": _coco_box(detection.bbox, truth.width, truth.height),
                                "score": float(detection.score)})
    counts = {name: 0 for name in names}
    for truth in truths:
        for category in truth.categories:
            counts[category] += 1
    empty = {name: {"ap_50": None, "ap_50_95": None, "boxes": counts[name]} for name in names}
    if not annotations:
        return DetectionMetrics(float("nan"), float("nan"), empty, len(truths))
    if not results:  # loadRes cannot take an empty list; nothing detected is AP 0 wherever there is truth
        per = {name: {"ap_50": 0.0 if counts[name] else None, "ap_50_95": 0.0 if counts[name] else None,
                      "boxes": counts[name]} for name in names}
        return DetectionMetrics(0.0, 0.0, per, len(truths))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground = COCO()
        ground.dataset = {"images": images, "annotations": annotations,
                          "categories": [{"id": number, "name": name} for name, number in category_id.items()]}
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision: [IoU thresholds (0.5:0.95), recall points, categories, area ranges, max dets]; area "all",
    # the last max-dets setting (100); -1 marks a category without ground truth.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_category: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(names):
        at_50, every = precision[0, :, k], precision[:, :, k]
        per_category[name] = {
            "ap_50": float(at_50[at_50 > -1].mean()) if (at_50 > -1).any() else None,
            "ap_50_95": float(every[every > -1].mean()) if (every > -1).any() else None,
            "boxes": counts[name],
        }
    return DetectionMetrics(float(evaluation.stats[1]), float(evaluation.stats[0]), per_category, len(truths))


def box_iou(a: BBox, b: BBox) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matching_detection(box: BBox, category: str, detections: Sequence[Detection],
                       min_iou: float = MATCH_IOU) -> Detection | None:
    """The highest-scoring detection of `category` overlapping `box` by at least `min_iou` (what a shopper
    tapping that item would get), or None."""
    candidates = [d for d in detections if d.category == category and box_iou(box, d.bbox) >= min_iou]
    return max(candidates, key=lambda d: d.score) if candidates else None


@dataclass
class EndToEnd:
    k: int
    items: int
    found: int  # items with a matching detection
    hr_given: float  # HR@K with the given boxes
    hr_detected: float  # HR@K with the detected boxes (no matching detection = miss)

    @property
    def ratio(self) -> float:
        return self.hr_detected / self.hr_given if self.hr_given > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"k": self.k, "items": self.items, "found": self.found, "recall": self.found / max(1, self.items),
                "hr_given": self.hr_given, "hr_detected": self.hr_detected, "ratio": self.ratio}


def end_to_end(dataset: STLDataset, pairs: Sequence[Pair], detections: dict[str, Sequence[Detection]],
               embedder: Embedder, product_vectors: dict[str, np.ndarray], k: int = 10,
               progress: bool = False) -> EndToEnd:
    """HR@K with given vs detected boxes, ranked over `product_vectors[category]` ([n, dim], ids sorted)."""
    candidates = {category: sorted(dataset.categories.products_in(category)) for category in product_vectors}
    ranks_given, ranks_detected, found = [], [], 0
    by_scene: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_scene.setdefault(pair.scene_id, []).append(pair)
    for scene_id, scene_pairs in tqdm(by_scene.items(), desc="end-to-end", unit="scene", disable=not progress):
        image = load_image(dataset.scene_path(scene_id))
        for pair in scene_pairs:
            category = dataset.categories.of(pair.product_id)
            products = candidates[category]
            positive = np.asarray([products.index(pair.product_id)])
            match = matching_detection(pair.bbox, category, detections.get(scene_id, []))
            boxes = [pair.bbox] + ([match.bbox] if match is not None else [])
            vectors = embedder.embed([image] * len(boxes), boxes, "scene")
            scores = vectors @ product_vectors[category].T
            ranks_given.append(int(positive_ranks(scores[:1], positive)[0]))
            if match is not None:
                found += 1
                ranks_detected.append(int(positive_ranks(scores[1:], positive)[0]))
            else:
                ranks_detected.append(NOT_FOUND)
    return EndToEnd(k, len(ranks_given), found, hit_rate_at_k(ranks_given, [k])[k],
                    hit_rate_at_k(ranks_detected, [k])[k])


def _product_vectors(dataset: STLDataset, embedder: Embedder, categories: Sequence[str],
                     cache: Path | None, progress: bool) -> dict[str, np.ndarray]:
    """Unit product vectors per category (ids sorted), from the retrieval feature cache."""
    products = sorted(pid for category in categories for pid in dataset.categories.products_in(category))
    features = cache_features(dataset, embedder, cache if cache is not None else dataset.root / ".cache" / "features",
                              pairs=[], products=products, progress=progress)
    return {category: embedder.project(features.product_features(sorted(dataset.categories.products_in(category))),
                                       "product")
            for category in categories}


def evaluate_detector(data: str | Path, detector_path: str | Path, head: str | Path | None = None,
                      out: str | Path | None = None, split_seed: int = 0, device: str = "auto",
                      score_threshold: float = 0.05, batch_size: int = 8, k: int = 10,
                      cache: Path | None = None, progress: bool = True) -> dict:
    """mAP on the test split and, with a retrieval head, the end-to-end HR@K; written to OUT/metrics.json."""
    try:
        dataset = STLDataset.open(data, on_error="skip")
    except FileNotFoundError as exc:
        raise DataError(f"cannot open dataset {data}: {exc}") from exc
    detector = load_detector(detector_path, device=device)
    test = split_by_scene(dataset.pairs, SPLIT_FRACTIONS, seed=split_seed).test
    if not test:
        raise DataError(f"the test split of {data} is empty")
    truths = scene_truths(dataset, test)
    predictions: list[list[Detection]] = []
    for start in tqdm(range(0, len(truths), batch_size), desc="detect", unit="batch", disable=not progress):
        images = [load_image(dataset.scene_path(t.scene_id)) for t in truths[start:start + batch_size]]
        predictions.extend(detector.detect(images, score_threshold=score_threshold, max_detections=100))
    metrics = coco_map(truths, predictions, detector.categories)
    result: dict = {"detector": str(detector_path), "split_seed": split_seed, "test": metrics.to_dict()}
    if head is not None:
        embedder = load_embedder(head, device=device)
        categories = sorted({dataset.categories.of(pair.product_id) for pair in test})
        vectors = _product_vectors(dataset, embedder, categories, cache, progress)
        detected = {t.scene_id: p for t, p in zip(truths, predictions, strict=True)}
        result["end_to_end"] = end_to_end(dataset, test, detected, embedder, vectors, k, progress).to_dict()
        result["head"] = str(head)
    if out is not None:
        write_json_atomic(Path(out) / "detector_metrics.json", result)
    return result
