"""`python -m training evaluate`: HR@K, binary accuracy and AUC of models on the held-out scenes."""

from __future__ import annotations

import argparse

from training.cli import report
from training.cli.args import (
    SEED,
    add_backbone_args,
    add_cache_arg,
    add_context_arg,
    add_data_arg,
    add_device_arg,
    add_progress_arg,
    add_split_seed_arg,
    add_workers_arg,
    directory,
)
from training.errors import TrainingError
from training.eval.metrics import DEFAULT_KS
from training.eval.rankers import EvaluateOptions, evaluate_dataset, format_table


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training evaluate",
        description="Rank all products of each test pair's category; report HR@K, binary accuracy and AUC.",
    )
    add_data_arg(parser)
    parser.add_argument("--model", action="append", required=True, dest="models",
                        help="'popularity', 'knn' (untrained backbone) or a head checkpoint path; repeatable")
    parser.add_argument("--out", type=directory, required=True, help="writes metrics.json and hr_at_k.png here")
    add_split_seed_arg(parser, help="seed of the scene split (as in training)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the binary-accuracy negatives")
    parser.add_argument("--part", choices=["val", "test"], default="test", help="which split part to rank")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="K values of HR@K")
    add_backbone_args(parser, help="backbone of the knn baseline")
    add_context_arg(parser, help="context margin around a scene crop's bbox for the knn baseline (checkpoints "
                                 "carry their own)")
    add_cache_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size")
    add_workers_arg(parser)
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        options = EvaluateOptions(models=tuple(args.models), part=args.part, ks=tuple(args.ks),
                                  split_seed=args.split_seed, seed=args.seed, backbone=args.backbone,
                                  backbone_weights=args.backbone_weights, context=args.context)
        evaluation = evaluate_dataset(args.data, args.out, options, args.cache, args.device, args.batch_size,
                                      args.workers, progress=not args.no_progress)
    except TrainingError as exc:
        return report(exc)
    print(format_table(evaluation.results, evaluation.ks))
    print(f"wrote {evaluation.metrics_path} and {evaluation.plot_path}")
    return 0
