"""The training run (`python -m training train`): split by scene, cache backbone features, train the head, save.

`fit_head` writes OUT/head.pt (the checkpoint: head weights plus everything to rebuild the embedder),
OUT/config.json (the resolved options) and OUT/train_log.json (per-epoch loss and val HR@K).
Re-running with the same options on the same data finds the complete checkpoint and stops early;
features are cached, so retraining (force, or new hyperparameters) takes seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from training.data.split import split_by_scene
from training.data.stl import Pair, STLDataset, dataset_fingerprint
from training.errors import DataError
from training.exec.executor import Executor
from training.fit.features import CachedFeatures, backbone_loader, cache_features
from training.fit.trainer import PairFeatures, Products, TrainConfig, hit_rates, train_head
from training.io import write_json_atomic
from training.model.backbones import load_backbone
from training.model.checkpoint import Checkpoint, CheckpointMismatch, TrainRecord, load_checkpoint, save_checkpoint
from training.model.embedder import Embedder
from training.model.head import HeadConfig

LOG = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "train_log.json"
REPORT_KS = (1, 10, 50)
DEFAULTS = TrainConfig()


@dataclass(frozen=True)
class FitOptions:
    """The settings that determine the trained weights: a rerun with equal options on the same data is up
    to date. (Where features are cached, the device, worker count and batch size of extraction are not here.)
    Invalid values raise DataError naming the `train` flags."""

    backbone: str = "efficientnet_lite0"
    backbone_weights: Path | None = None
    context: float = 0.1  # context margin around a scene crop's bbox
    epochs: int = DEFAULTS.epochs
    batch_size: int = DEFAULTS.batch_size
    lr: float = DEFAULTS.lr
    weight_decay: float = DEFAULTS.weight_decay
    margin: float = DEFAULTS.margin
    loss: str = DEFAULTS.loss
    miner: str = DEFAULTS.miner
    triplets_per_anchor: int = DEFAULTS.triplets_per_anchor
    negatives: int = DEFAULTS.negatives
    hard_pool: int = DEFAULTS.hard_pool
    categories_per_batch: int = DEFAULTS.categories_per_batch
    patience: int = DEFAULTS.patience
    hidden_dim: int = 512
    dim: int = 128
    dropout: float = 0.2
    separate_heads: bool = False
    seed: int = 0  # of initialisation, sampling and mining
    split_seed: int = 0  # of the scene split (as in evaluate and index build)

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise DataError(problem)

    def _problem(self) -> str | None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "dim": self.dim,
                    "hidden_dim": self.hidden_dim, "patience": self.patience,
                    "triplets_per_anchor": self.triplets_per_anchor}
        bad = [f"--{name.replace('_', '-')} must be >= 1 (got {value})" for name, value in positive.items()
               if value < 1]
        if self.batch_size < 2:
            bad.append("--batch-size must be >= 2 (BatchNorm needs two rows)")
        if self.lr <= 0 or self.margin <= 0:
            bad.append("--lr and --margin must be positive")
        if not 0 <= self.dropout < 1:
            bad.append("--dropout must lie in [0, 1)")
        if self.context < 0:
            bad.append("--context must be >= 0")
        if self.negatives < 0 or self.hard_pool < 0 or self.categories_per_batch < 0:
            bad.append("--negatives, --hard-pool and --categories-per-batch must be >= 0")
        return "; ".join(bad) or None

    def trainer_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            margin=self.margin, loss=self.loss, miner=self.miner,  # type: ignore[arg-type]
            triplets_per_anchor=self.triplets_per_anchor, negatives=self.negatives, hard_pool=self.hard_pool,
            categories_per_batch=self.categories_per_batch, patience=self.patience, seed=self.seed,
        )

    def head_config(self, in_dim: int) -> HeadConfig:
        return HeadConfig(in_dim=in_dim, hidden_dim=self.hidden_dim, out_dim=self.dim, dropout=self.dropout,
                          separate=self.separate_heads)

    def resolved(self, data: str | Path) -> dict:
        """config.json and the checkpoint's `args`: the options and the dataset path, sorted, JSON-ready."""
        values = {field.name: getattr(self, field.name) for field in fields(self)} | {"data": Path(data)}
        return {key: str(value) if isinstance(value, Path) else value for key, value in sorted(values.items())}


@dataclass
class FitResult:
    checkpoint: Checkpoint  # its sha256 is the file's
    path: Path  # OUT/head.pt
    metrics: dict  # best_epoch, epochs_run, timings, and per split part {"hr@K": ..., "n": ...}
    up_to_date: bool  # an existing checkpoint already matched: nothing was trained or written


def _up_to_date(out: Path, config: dict, fingerprint: str) -> Checkpoint | None:
    """The existing checkpoint, when it is complete and was trained with this config on this data."""
    if not (out / HEAD_FILE).is_file() or not (out / CONFIG_FILE).is_file():
        return None
    try:
        checkpoint = load_checkpoint(out / HEAD_FILE)
    except CheckpointMismatch as exc:
        LOG.warning("retraining: %s", exc)
        return None
    if checkpoint.train_config.args != config or checkpoint.data_fingerprint != fingerprint:
        return None
    return checkpoint


@dataclass
class FeatureTables:
    products: Products
    product_ids: list[str]
    parts: dict[str, PairFeatures]


def build_tables(dataset: STLDataset, features: CachedFeatures, parts: dict[str, list[Pair]]) -> FeatureTables:
    """Arrays for the trainer: the catalogue's product features with category ids, and per split part the
    scene features of its pairs. Pairs whose scene crop or product has no features (not in the catalogue,
    or the image failed to decode) are left out with a warning."""
    product_ids = [pid for pid in dataset.catalogue() if features.has_product(pid)]
    row_of = {pid: i for i, pid in enumerate(product_ids)}
    category_id = {path: i for i, path in enumerate(dataset.categories.paths)}
    category = np.array([category_id[dataset.categories.of(pid)] for pid in product_ids], dtype=np.int64)
    products = Products(np.asarray(features.product_features(product_ids), dtype=np.float32), category)
    tables: dict[str, PairFeatures] = {}
    for name, pairs in parts.items():
        kept = [pair for pair in pairs if pair.product_id in row_of and features.has_scene(pair)]
        if len(kept) < len(pairs):
            LOG.warning("%s: left out %d of %d pairs without features", name, len(pairs) - len(kept), len(pairs))
        scene = (np.asarray(features.scene_features(kept), dtype=np.float32) if kept
                 else np.zeros((0, products.features.shape[1]), dtype=np.float32))
        tables[name] = PairFeatures(scene, np.array([row_of[p.product_id] for p in kept], dtype=np.int64))
    return FeatureTables(products, product_ids, tables)


def fit_head(
    data: str | Path,
    out: str | Path,
    options: FitOptions = FitOptions(),
    cache: str | Path | None = None,
    device: str = "auto",
    workers: int = 2,
    feature_batch_size: int = 64,
    progress: bool = True,
    force: bool = False,
    executor: Executor | None = None,
) -> FitResult:
    """Train a head on a dataset directory and write OUT/head.pt, config.json and train_log.json.

    `cache` (default <data>/.cache/features) holds the backbone features. Unless `force`, a complete
    checkpoint in OUT trained with the same options on the same data is returned as it is. `executor` extracts
    the features that are not cached yet (`training.exec`: this process by default, or a Ray cluster, whose
    workers rebuild the backbone from `options`); the head trains here either way.
    """
    data, out = Path(data), Path(out)
    try:
        dataset = STLDataset.open(data)
        fingerprint = dataset_fingerprint(data)
    except (FileNotFoundError, DataError) as exc:
        raise DataError(f"cannot open dataset {data}: {exc}") from exc
    config = options.resolved(data)
    existing = None if force else _up_to_date(out, config, fingerprint)
    if existing is not None:
        LOG.info("%s is up to date (same config and data)", out / HEAD_FILE)
        return FitResult(existing, out / HEAD_FILE, existing.metrics, up_to_date=True)

    split = split_by_scene(dataset.pairs, seed=options.split_seed)
    if len(split.train) < 2 or not split.val:
        raise DataError(f"{data} has too few pairs to train and validate "
                        f"({len(split.train)} train, {len(split.val)} val)")
    backbone = load_backbone(options.backbone, options.backbone_weights)
    embedder = Embedder(backbone, None, options.context, device)
    started = time.perf_counter()
    cache_root = Path(cache) if cache is not None else data / ".cache" / "features"
    weights = None if options.backbone_weights is None else Path(options.backbone_weights).resolve()
    features = cache_features(dataset, embedder, cache_root, pairs=dataset.pairs, products=dataset.catalogue(),
                              batch_size=feature_batch_size, workers=workers, progress=progress, executor=executor,
                              load=backbone_loader(options.backbone, weights, options.context))
    tables = build_tables(dataset, features, {"train": split.train, "val": split.val, "test": split.test})
    feature_seconds = time.perf_counter() - started
    if len(tables.parts["train"]) < 2:
        raise DataError("fewer than 2 training pairs have a product image")

    head_config = options.head_config(backbone.dim)
    trainer_config = options.trainer_config()
    started = time.perf_counter()
    result = train_head(tables.parts["train"], tables.products, head_config, trainer_config,
                        val=tables.parts["val"], device=embedder.device, progress=progress)
    train_seconds = time.perf_counter() - started

    metrics: dict = {"best_epoch": result.best_epoch, "epochs_run": len(result.history),
                     "feature_seconds": round(feature_seconds, 2), "train_seconds": round(train_seconds, 2)}
    for part in ("val", "test"):
        if len(tables.parts[part]):
            rates = hit_rates(result.head, tables.parts[part], tables.products, REPORT_KS)
            metrics[part] = {f"hr@{k}": round(v, 4) for k, v in rates.items()} | {"n": len(tables.parts[part])}
    checkpoint = Checkpoint(
        head_config=head_config,
        state_dict=result.head.state_dict(),
        backbone_name=backbone.name,
        backbone_weights_sha256=backbone.weights_sha256,
        preprocess=embedder.preprocess,
        train_config=TrainRecord(split_seed=options.split_seed, args=config, trainer=trainer_config.to_dict()),
        data_fingerprint=fingerprint,
        metrics=metrics,
    )
    # config.json and the log first, head.pt last: a complete head.pt means the run finished.
    write_json_atomic(out / CONFIG_FILE, config)
    write_json_atomic(out / LOG_FILE, {"history": result.history, "metrics": metrics})
    checkpoint.sha256 = save_checkpoint(out / HEAD_FILE, checkpoint)
    LOG.info("wrote %s (sha256 %s)", out / HEAD_FILE, checkpoint.sha256[:12])
    return FitResult(checkpoint, out / HEAD_FILE, metrics, up_to_date=False)
