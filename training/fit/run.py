"""`python -m training train`: split by scene, cache backbone features, train the head, save a checkpoint.

Writes OUT/head.pt (the checkpoint: head weights plus everything to rebuild the embedder),
OUT/config.json (the resolved arguments) and OUT/train_log.json (per-epoch loss and val HR@K).
Re-running with the same arguments on the same data finds the complete checkpoint and stops early;
features are cached, so retraining (--force, or new hyperparameters) takes seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.data.split import split_by_scene
from training.data.stl import (
    Pair,
    STLDataset,
    dataset_fingerprint,
)
from training.fit.mining import MINER_KINDS
from training.fit.trainer import LOSSES, PairFeatures, Products, TrainConfig, hit_rates, train_head
from training.model.checkpoint import Checkpoint, CheckpointMismatch, TrainRecord, load_checkpoint, save_checkpoint
from training.model.head import HeadConfig

if TYPE_CHECKING:
    from training.fit.features import CachedFeatures

LOG = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "train_log.json"
REPORT_KS = (1, 10, 50)
DEFAULTS = TrainConfig()
# Arguments that do not change the trained weights, so they do not make a checkpoint stale.
_NOT_CONFIG = {"out", "cache", "device", "force", "no_progress", "workers", "feature_batch_size"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training train", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="STL dataset directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory for head.pt, config.json, log")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="frozen backbone (registry name)")
    parser.add_argument("--backbone-weights", type=Path, default=None, help="weights file for the backbone")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--context", type=float, default=0.1, help="context margin around a scene crop's bbox")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    parser.add_argument("--margin", type=float, default=DEFAULTS.margin, help="triplet loss margin")
    parser.add_argument("--loss", choices=LOSSES, default=DEFAULTS.loss,
                        help="triplet distance: l2 (squared, the paper's) or cosine")
    parser.add_argument("--miner", choices=MINER_KINDS, default=DEFAULTS.miner, help="triplet selection")
    parser.add_argument("--triplets-per-anchor", type=int, default=DEFAULTS.triplets_per_anchor,
                        help="most triplets the miner keeps per anchor")
    parser.add_argument("--negatives", type=int, default=DEFAULTS.negatives,
                        help="sampled same-category negatives per pair (besides in-batch ones)")
    parser.add_argument("--hard-pool", type=int, default=DEFAULTS.hard_pool,
                        help="draw half the sampled negatives from the model's top-N near misses (0: off)")
    parser.add_argument("--categories-per-batch", type=int, default=DEFAULTS.categories_per_batch,
                        help="categories a batch is drawn from (0: plain shuffle)")
    parser.add_argument("--patience", type=int, default=DEFAULTS.patience, help="early stopping patience (epochs)")
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--separate-heads", action="store_true", help="one head for scenes, one for products")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and mining")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the scene split (as in evaluate)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="feature cache directory (default: <data>/.cache/features)")
    parser.add_argument("--feature-batch-size", type=int, default=64, help="feature extraction batch size")
    parser.add_argument("--workers", type=int, default=2, help="image decoding workers")
    parser.add_argument("--force", action="store_true", help="retrain even if OUT/head.pt is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolved_config(args: argparse.Namespace) -> dict:
    """The arguments that determine the weights, JSON-ready (paths as strings)."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in sorted(vars(args).items()) if key not in _NOT_CONFIG}


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        margin=args.margin, loss=args.loss, miner=args.miner,
        triplets_per_anchor=args.triplets_per_anchor, negatives=args.negatives, hard_pool=args.hard_pool,
        categories_per_batch=args.categories_per_batch, patience=args.patience, seed=args.seed,
    )


def _validate(args: argparse.Namespace) -> str | None:
    positive = {"epochs": args.epochs, "batch_size": args.batch_size, "dim": args.dim, "hidden_dim": args.hidden_dim,
                "patience": args.patience,
                "triplets_per_anchor": args.triplets_per_anchor}
    bad = [f"--{name.replace('_', '-')} must be >= 1 (got {value})" for name, value in positive.items() if value < 1]
    if args.batch_size < 2:
        bad.append("--batch-size must be >= 2 (BatchNorm needs two rows)")
    if args.lr <= 0 or args.margin <= 0:
        bad.append("--lr and --margin must be positive")
    if not 0 <= args.dropout < 1:
        bad.append("--dropout must lie in [0, 1)")
    if args.context < 0:
        bad.append("--context must be >= 0")
    if args.negatives < 0 or args.hard_pool < 0 or args.categories_per_batch < 0:
        bad.append("--negatives, --hard-pool and --categories-per-batch must be >= 0")
    return "; ".join(bad) or None


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


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    problem = _validate(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        dataset = STLDataset.open(args.data)
        fingerprint = dataset_fingerprint(args.data)
    except (FileNotFoundError, ValueError) as exc:  # STLFormatError is a ValueError
        print(f"error: cannot open dataset {args.data}: {exc}", file=sys.stderr)
        return 2
    config = resolved_config(args)
    existing = None if args.force else _up_to_date(args.out, config, fingerprint)
    if existing is not None:
        print(f"{args.out / HEAD_FILE} is up to date (same config and data); use --force to retrain")
        _print_metrics(existing.metrics)
        return 0

    split = split_by_scene(dataset.pairs, seed=args.split_seed)
    if len(split.train) < 2 or not split.val:
        print(f"error: {args.data} has too few pairs to train and validate "
              f"({len(split.train)} train, {len(split.val)} val)", file=sys.stderr)
        return 2
    try:
        from training.fit.features import cache_features
        from training.model.backbones import load_backbone
        from training.model.embedder import Embedder

        backbone = load_backbone(args.backbone, args.backbone_weights)
        embedder = Embedder(backbone, None, args.context, args.device)
        started = time.perf_counter()
        cache_root = args.cache if args.cache is not None else args.data / ".cache" / "features"
        features = cache_features(dataset, embedder, cache_root, pairs=dataset.pairs, products=dataset.catalogue(),
                                  batch_size=args.feature_batch_size, workers=args.workers,
                                  progress=not args.no_progress)
        tables = build_tables(dataset, features, {"train": split.train, "val": split.val, "test": split.test})
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as exc:
        # BackboneUnavailable is a RuntimeError and device errors are ValueErrors: both carry a full message.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    feature_seconds = time.perf_counter() - started
    if len(tables.parts["train"]) < 2:
        print("error: fewer than 2 training pairs have a product image", file=sys.stderr)
        return 2

    head_config = HeadConfig(in_dim=backbone.dim, hidden_dim=args.hidden_dim, out_dim=args.dim,
                             dropout=args.dropout, separate=args.separate_heads)
    started = time.perf_counter()
    result = train_head(tables.parts["train"], tables.products, head_config, train_config(args),
                        val=tables.parts["val"], device=embedder.device, progress=not args.no_progress)
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
        train_config=TrainRecord(split_seed=args.split_seed, args=config, trainer=train_config(args).to_dict()),
        data_fingerprint=fingerprint,
        metrics=metrics,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    # config.json and the log first, head.pt last: a complete head.pt means the run finished.
    (args.out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (args.out / LOG_FILE).write_text(json.dumps({"history": result.history, "metrics": metrics}, indent=2) + "\n",
                                     encoding="utf-8")
    sha256 = save_checkpoint(args.out / HEAD_FILE, checkpoint)
    print(f"wrote {args.out / HEAD_FILE} (sha256 {sha256[:12]}), {CONFIG_FILE}, {LOG_FILE}")
    _print_metrics(metrics)
    return 0


def _print_metrics(metrics: dict) -> None:
    for part in ("val", "test"):
        if part in metrics:
            rates = ", ".join(f"{key.upper()}={value:.3f}" for key, value in metrics[part].items() if key != "n")
            print(f"{part} ({metrics[part]['n']} pairs): {rates}")


if __name__ == "__main__":
    sys.exit(main())
