"""Training the item detector on cached backbone pyramids.

The backbone is frozen, so its multi-scale maps of a scene depend only on (backbone, weights, detection
preprocessing) and are computed once. They live in `cache_root/detect-<backbone>-<weights_sha[:12]>-
<preprocess_sha[:12]>/`, like the retrieval feature cache (`training.fit.features`):

- `manifest.json`: what produced the maps (checked on every open);
- `<seq>-level<i>.npy` (float16 [rows, C, H, W] memmaps, one per pyramid level) + `<seq>.keys` (one scene
  id per line). Rows are flushed before their keys are appended, so a key is listed only once its maps are
  on disk; a run killed half-way keeps every finished chunk and the next run extracts only what is missing.

float16 halves the cache (lite0 at 416 px: ~0.48 MB a scene) and the head trains in float32.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from training.data.split import SPLIT_FRACTIONS, split_by_scene
from training.data.stl import STLDataset, dataset_fingerprint
from training.errors import DataError, TrainingError
from training.eval.detection import SceneTruth, coco_map, scene_truths
from training.io import write_json_atomic, write_text_atomic
from training.model.backbones import Backbone, load_backbone
from training.model.detector import (
    DetectorCheckpoint,
    DetectorConfig,
    DetectorNet,
    build_pyramid,
    detect_on_maps,
    detection_preprocess,
    pyramid_spec,
    save_detector,
)
from training.model.device import resolve_device
from training.model.embedder import freeze_for_cpu
from training.model.preprocess import Preprocess, load_image, to_tensor

LOG = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
DTYPE = np.float16
CHECKPOINT_FILE = "detector.pt"
LOG_FILE = "detector_log.json"
_KEYS_RE = re.compile(r"^(\d{6})\.keys$")


class PyramidCacheError(TrainingError, RuntimeError):
    """The cache directory belongs to another backbone/preprocessing, or its files are unreadable."""


# ---------------------------------------------------------------- the pyramid cache

def pyramid_cache_dir(cache_root: str | Path, backbone: Backbone, preprocess: Preprocess) -> Path:
    return Path(cache_root) / f"detect-{backbone.name}-{backbone.weights_sha256[:12]}-{preprocess.sha256()[:12]}"


def _fingerprint(backbone: Backbone, preprocess: Preprocess) -> dict:
    spec = pyramid_spec(backbone.name)
    return {"format": CACHE_FORMAT, "backbone": backbone.name, "backbone_weights_sha256": backbone.weights_sha256,
            "preprocess": preprocess.to_dict(), "strides": list(spec.strides), "channels": list(spec.channels),
            "dtype": np.dtype(DTYPE).name}


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with (directory / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _committed_keys(path: Path) -> list[str]:
    """Keys of a segment; a line torn by a kill (no trailing newline) is not committed."""
    return path.read_text(encoding="utf-8").split("\n")[:-1] if path.is_file() else []


class PyramidCache:
    """Read access: scene id -> its pyramid maps (memory-mapped, copied out per batch)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise PyramidCacheError(f"{self.directory} is not a readable pyramid cache: {exc}") from exc
        self.levels = len(self.manifest["strides"])
        self.segments: list[list[np.ndarray]] = []
        self.index: dict[str, tuple[int, int]] = {}
        for keys_path in sorted(p for p in self.directory.glob("*.keys") if _KEYS_RE.match(p.name)):
            keys = _committed_keys(keys_path)
            if not keys:
                continue
            seq = keys_path.stem
            try:
                arrays = [np.load(self.directory / f"{seq}-level{i}.npy", mmap_mode="r") for i in range(self.levels)]
            except (OSError, ValueError) as exc:
                raise PyramidCacheError(f"segment {seq} of {self.directory} is unreadable ({exc}); delete it") from exc
            number = len(self.segments)
            self.segments.append(arrays)
            self.index.update((key, (number, row)) for row, key in enumerate(keys))

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, scene_id: str) -> bool:
        return scene_id in self.index

    def maps(self, scene_ids: Sequence[str]) -> list[torch.Tensor]:
        """float32 [len(scene_ids), C, H, W] per level, in order."""
        missing = [scene for scene in scene_ids if scene not in self.index]
        if missing:
            raise DataError(f"no cached pyramid for scenes {missing[:5]} in {self.directory}")
        levels = []
        for level in range(self.levels):
            rows = [self.segments[self.index[s][0]][level][self.index[s][1]] for s in scene_ids]
            levels.append(torch.from_numpy(np.stack(rows).astype(np.float32)))
        return levels


class _Scenes(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> torch.Tensor:
        return to_tensor(load_image(self.paths[position]), None, self.preprocess)


def cache_pyramids(dataset: STLDataset, scene_ids: Sequence[str], backbone: Backbone, preprocess: Preprocess,
                   cache_root: str | Path, device: str = "auto", batch_size: int = 16, workers: int = 2,
                   progress: bool = True) -> PyramidCache:
    """Run the frozen backbone over every scene not cached yet; open the cache."""
    directory = pyramid_cache_dir(cache_root, backbone, preprocess)
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(backbone, preprocess)
    with _locked(directory):
        manifest = directory / MANIFEST_FILE
        if manifest.is_file():
            found = json.loads(manifest.read_text(encoding="utf-8"))
            if found != fingerprint:
                raise PyramidCacheError(f"pyramid cache {directory} was written by another backbone or "
                                        "preprocessing; delete it or use another --cache directory")
        else:
            write_text_atomic(manifest, json.dumps(fingerprint, indent=2, sort_keys=True))
        have = PyramidCache(directory)
        missing = list(dict.fromkeys(s for s in scene_ids if s not in have))
        LOG.info("pyramid cache %s: %d scenes cached, %d to extract", directory, len(have), len(missing))
        if missing:
            _extract(directory, dataset, missing, backbone, preprocess, device, batch_size, workers, progress)
    return PyramidCache(directory)


def _extract(directory: Path, dataset: STLDataset, missing: list[str], backbone: Backbone, preprocess: Preprocess,
             device: str, batch_size: int, workers: int, progress: bool) -> None:
    target = resolve_device(device)
    pyramid = build_pyramid(backbone).to(target)
    if target.type == "cpu":
        pyramid = freeze_for_cpu(pyramid, preprocess.image_size, torch.contiguous_format)
    spec = pyramid_spec(backbone.name)
    numbers = [int(m[1]) for p in directory.glob("*.keys") if (m := _KEYS_RE.match(p.name))]
    seq = f"{max(numbers, default=0) + 1:06d}"
    shapes = [(len(missing), c, math.ceil(preprocess.image_size / s), math.ceil(preprocess.image_size / s))
              for c, s in zip(spec.channels, spec.strides, strict=True)]
    arrays = [np.lib.format.open_memmap(directory / f"{seq}-level{i}.npy", mode="w+", dtype=DTYPE, shape=shape)
              for i, shape in enumerate(shapes)]
    keys_path = directory / f"{seq}.keys"
    loader = DataLoader(_Scenes([dataset.scene_path(s) for s in missing], preprocess), batch_size=batch_size,
                        num_workers=workers, prefetch_factor=2 if workers > 0 else None)
    row = 0
    try:
        with tqdm(total=len(missing), unit="scene", desc="pyramids", disable=not progress) as bar, \
                torch.inference_mode():
            for batch in loader:
                maps = pyramid(batch.to(target))
                for array, level in zip(arrays, maps, strict=True):
                    if tuple(level.shape[1:]) != array.shape[1:]:
                        raise PyramidCacheError(f"pyramid level of shape {tuple(level.shape[1:])}, "
                                                f"expected {array.shape[1:]}")
                    array[row:row + len(batch)] = level.float().cpu().numpy().astype(DTYPE)
                    array.flush()
                with keys_path.open("a", encoding="utf-8") as out:
                    out.write("".join(f"{s}\n" for s in missing[row:row + len(batch)]))
                    out.flush()
                    os.fsync(out.fileno())
                row += len(batch)
                bar.update(len(batch))
    finally:
        del arrays


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class DetectorFitOptions:
    """What `train-detector` trains with; saved in the checkpoint (`train_config`)."""

    backbone: str = "efficientnet_lite0"
    image_size: int = DetectorConfig.image_size
    fpn_channels: int = DetectorConfig.fpn_channels
    head_convs: int = DetectorConfig.head_convs
    epochs: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 4  # epochs without a better val mAP@0.5:0.95 before stopping
    seed: int = 0
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise DataError("epochs, batch_size and patience must be >= 1 and lr > 0")

    def model_config(self) -> DetectorConfig:
        return DetectorConfig(self.image_size, self.fpn_channels, self.head_convs)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = DetectorFitOptions()


def _targets(truths: Sequence[SceneTruth], label_of: dict[str, int], size: int,
             device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[v * size for v in box] for box in t.boxes], dtype=torch.float32,
                                   device=device).reshape(-1, 4),
             "labels": torch.tensor([label_of[c] for c in t.categories], dtype=torch.int64, device=device)}
            for t in truths]


def predict_cached(net: DetectorNet, cache: PyramidCache, truths: Sequence[SceneTruth], categories: Sequence[str],
                   batch_size: int = 32, score_threshold: float = 0.05, max_detections: int = 100) -> list:
    predictions: list = []
    for start in range(0, len(truths), batch_size):
        maps = cache.maps([t.scene_id for t in truths[start:start + batch_size]])
        predictions.extend(detect_on_maps(net, maps, categories, score_threshold, 0.6, max_detections))
    return predictions


def train_detector(net: DetectorNet, cache: PyramidCache, train: Sequence[SceneTruth], val: Sequence[SceneTruth],
                   categories: Sequence[str], options: DetectorFitOptions, device: torch.device,
                   progress: bool = True) -> list[dict]:
    """AdamW + cosine schedule on cached maps; keeps the epoch with the best val mAP@0.5:0.95 in `net`."""
    if not train:
        raise DataError("no training scenes with boxes")
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    net.to(device).train()
    label_of = {name: index for index, name in enumerate(categories)}
    optimiser = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps = options.epochs * math.ceil(len(train) / options.batch_size)
    warmup = min(100, steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1.0 + math.cos(math.pi * min(1.0, step / steps))))
    log: list[dict] = []
    best, best_state, stale = -1.0, copy.deepcopy(net.state_dict()), 0
    for epoch in range(options.epochs):
        started, total, batches = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(train), generator=generator).tolist()
        chunks = [order[i:i + options.batch_size] for i in range(0, len(order), options.batch_size)]
        for chunk in tqdm(chunks, desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, leave=False):
            chunk = sorted(chunk)  # memmap rows in file order
            scenes = [train[i] for i in chunk]
            maps = [level.to(device) for level in cache.maps([t.scene_id for t in scenes])]
            losses = net.loss(maps, _targets(scenes, label_of, options.image_size, device))
            loss = sum(losses.values())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            optimiser.step()
            schedule.step()
            total, batches = total + float(loss.detach()), batches + 1
        record = {"epoch": epoch + 1, "loss": total / max(1, batches), "seconds": time.perf_counter() - started}
        if val:
            metrics = coco_map(val, predict_cached(net, cache, val, categories), categories)
            record.update(val_map_50=metrics.map_50, val_map_50_95=metrics.map_50_95)
            score = metrics.map_50_95
        else:
            score = -record["loss"]
        LOG.info("detector epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items()})
        log.append(record)
        if score > best:
            best, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= options.patience:
                LOG.info("stopping: no better val mAP for %d epochs", stale)
                break
    net.load_state_dict(best_state)
    net.eval()
    return log


@dataclass
class FittedDetector:
    path: Path
    metrics: dict
    log: list[dict]
    seconds: float
    sha256: str


def fit_detector(data: str | Path, out: str | Path, options: DetectorFitOptions = DEFAULTS,
                 cache: str | Path | None = None, device: str = "auto", workers: int = 2,
                 backbone_weights: str | Path | None = None, progress: bool = True) -> FittedDetector:
    """Split by scene, cache pyramids, train, evaluate on val and test (cached maps), write OUT/detector.pt."""
    started = time.perf_counter()
    try:
        dataset = STLDataset.open(data, on_error="skip")
    except FileNotFoundError as exc:
        raise DataError(f"cannot open dataset {data}: {exc}") from exc
    if not dataset.pairs:
        raise DataError(f"{data} has no usable pairs")
    backbone = load_backbone(options.backbone, backbone_weights)
    config = options.model_config()
    preprocess = detection_preprocess(backbone, config.image_size)
    split = split_by_scene(dataset.pairs, SPLIT_FRACTIONS, seed=options.split_seed)
    parts = {name: scene_truths(dataset, pairs) for name, pairs in
             (("train", split.train), ("val", split.val), ("test", split.test))}
    categories = dataset.categories.paths
    scene_ids = [t.scene_id for part in parts.values() for t in part]
    target = resolve_device(device)
    pyramids = cache_pyramids(dataset, scene_ids, backbone, preprocess,
                              cache if cache is not None else Path(data) / ".cache" / "pyramids",
                              device=device, workers=workers, progress=progress)
    extracted = time.perf_counter()
    torch.manual_seed(options.seed)  # the head's initial weights too: a run is reproducible
    net = DetectorNet(pyramid_spec(backbone.name), len(categories), config)
    log = train_detector(net, pyramids, parts["train"], parts["val"], categories, options, target, progress)
    trained = time.perf_counter()
    metrics = {part: coco_map(parts[part], predict_cached(net, pyramids, parts[part], categories),
                              categories).to_dict() for part in ("val", "test") if parts[part]}
    metrics["seconds"] = {"pyramids": extracted - started, "train": trained - extracted}
    checkpoint = DetectorCheckpoint(config, list(categories), net.state_dict(), backbone.name,
                                    backbone.weights_sha256, preprocess, options.to_dict(), metrics,
                                    dataset_fingerprint(data))
    path = Path(out) / CHECKPOINT_FILE
    sha256 = save_detector(path, checkpoint)
    write_json_atomic(Path(out) / LOG_FILE, {"options": options.to_dict(), "epochs": log, "metrics": metrics})
    return FittedDetector(path, metrics, log, time.perf_counter() - started, sha256)


OPTION_NAMES = tuple(f.name for f in fields(DetectorFitOptions))
