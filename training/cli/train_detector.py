"""`python -m training train-detector`: split by scene, cache backbone pyramids, train the FPN + FCOS head.

Writes OUT/detector.pt (config, categories, metrics, train options) and OUT/detector_log.json.
"""

from __future__ import annotations

import argparse

from training.cli import report
from training.cli.args import (
    SEED,
    add_backbone_args,
    add_cache_arg,
    add_data_arg,
    add_device_arg,
    add_progress_arg,
    add_split_seed_arg,
    add_workers_arg,
    directory,
    number,
)
from training.errors import TrainingError
from training.fit.detector import DEFAULTS, LOG_FILE, DetectorFitOptions, fit_detector


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training train-detector",
                                     description="train the item detector (FPN + FCOS head on the frozen "
                                                 "backbone's cached feature pyramid)")
    add_data_arg(parser)
    parser.add_argument("--out", type=directory, required=True, help="output directory for detector.pt and its log")
    add_backbone_args(parser)
    add_device_arg(parser)
    parser.add_argument("--image-size", type=int, default=DEFAULTS.image_size, help="square input side (pixels)")
    parser.add_argument("--fpn-channels", type=int, default=DEFAULTS.fpn_channels)
    parser.add_argument("--head-convs", type=int, default=DEFAULTS.head_convs, help="convs per FCOS tower")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--lr", type=number(0.0, above=True), default=DEFAULTS.lr)
    parser.add_argument("--weight-decay", type=number(0.0), default=DEFAULTS.weight_decay)
    parser.add_argument("--patience", type=int, default=DEFAULTS.patience, help="early stopping patience (epochs)")
    parser.add_argument("--seed", type=SEED, default=DEFAULTS.seed)
    add_split_seed_arg(parser, help="seed of the scene split (as in train and evaluate)")
    add_cache_arg(parser, help="pyramid cache directory (default: <data>/.cache/pyramids)")
    add_workers_arg(parser)
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        options = DetectorFitOptions(
            backbone=args.backbone, image_size=args.image_size, fpn_channels=args.fpn_channels,
            head_convs=args.head_convs, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, patience=args.patience, seed=args.seed, split_seed=args.split_seed)
        fitted = fit_detector(args.data, args.out, options, cache=args.cache, device=args.device,
                              workers=args.workers, backbone_weights=args.backbone_weights,
                              progress=not args.no_progress)
    except TrainingError as exc:
        return report(exc)
    print(f"wrote {fitted.path} (sha256 {fitted.sha256[:12]}) and {LOG_FILE} in {fitted.seconds:.0f} s")
    for part in ("val", "test"):
        if part in fitted.metrics:
            metrics = fitted.metrics[part]
            print(f"{part} ({metrics['scenes']} scenes): mAP@0.5={metrics['map_50']:.3f} "
                  f"mAP@0.5:0.95={metrics['map_50_95']:.3f}")
    return 0
