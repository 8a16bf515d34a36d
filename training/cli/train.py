"""`python -m training train`: split by scene, cache backbone features, train the head, save a checkpoint.

Writes OUT/head.pt, OUT/config.json and OUT/train_log.json (see `training.fit.run`).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from training.cli import report
from training.cli.args import (
    SEED,
    add_backbone_args,
    add_cache_arg,
    add_context_arg,
    add_data_arg,
    add_device_arg,
    add_engine_args,
    add_progress_arg,
    add_split_seed_arg,
    add_workers_arg,
    directory,
    number,
)
from training.errors import TrainingError
from training.exec.choose import open_executor
from training.fit.mining import MINER_KINDS
from training.fit.run import CONFIG_FILE, DEFAULTS, LOG_FILE, FitOptions, fit_head
from training.fit.trainer import LOSSES


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training train",
                                     description="split by scene, cache backbone features, train the head, "
                                                 "save a checkpoint")
    add_data_arg(parser)
    parser.add_argument("--out", type=directory, required=True, help="output directory for head.pt, config.json, log")
    add_backbone_args(parser)
    add_device_arg(parser)
    add_context_arg(parser)
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=number(0.0, above=True), default=DEFAULTS.lr)
    parser.add_argument("--weight-decay", type=number(0.0), default=DEFAULTS.weight_decay)
    parser.add_argument("--margin", type=number(0.0, above=True), default=DEFAULTS.margin, help="triplet loss margin")
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
    parser.add_argument("--seed", type=SEED, default=0, help="seed of initialisation, sampling and mining")
    add_split_seed_arg(parser, help="seed of the scene split (as in evaluate)")
    add_cache_arg(parser)
    parser.add_argument("--feature-batch-size", type=int, default=64, help="feature extraction batch size")
    add_workers_arg(parser)
    parser.add_argument("--force", action="store_true", help="retrain even if OUT/head.pt is up to date")
    add_engine_args(parser, what="the feature extraction")
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        options = FitOptions(**{field.name: getattr(args, field.name) for field in fields(FitOptions)})
        with open_executor(args.engine, args.ray_address, args.workers) as executor:
            fitted = fit_head(args.data, args.out, options, cache=args.cache, device=args.device,
                              workers=args.workers, feature_batch_size=args.feature_batch_size,
                              progress=not args.no_progress, force=args.force, executor=executor)
    except TrainingError as exc:
        return report(exc)
    if fitted.up_to_date:
        print(f"{fitted.path} is up to date (same config and data); use --force to retrain")
    else:
        sha256 = fitted.checkpoint.sha256 or ""
        print(f"wrote {fitted.path} (sha256 {sha256[:12]}), {CONFIG_FILE}, {LOG_FILE}")
    for part in ("val", "test"):
        if part in fitted.metrics:
            rates = ", ".join(f"{key.upper()}={value:.3f}" for key, value in fitted.metrics[part].items()
                              if key != "n")
            print(f"{part} ({fitted.metrics[part]['n']} pairs): {rates}")
    return 0
