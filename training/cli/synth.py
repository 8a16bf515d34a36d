"""`python -m training synth`: write the synthetic STL-format catalogue (our default dataset)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from training.cli import report
from training.cli.args import SEED, add_progress_arg, add_workers_arg, number
from training.data.stl import short_name
from training.data.synth import DEFAULT_CATEGORIES_SOURCE, SynthConfig, generate, load_category_counts
from training.errors import TrainingError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training synth",
                                     description="a synthetic catalogue in the STL format, our default dataset")
    defaults = SynthConfig()
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--scenes", type=int, default=defaults.scenes)
    parser.add_argument("--products", type=int, default=defaults.products)
    parser.add_argument("--seed", type=SEED, default=defaults.seed)
    parser.add_argument("--scene-size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"),
                        default=(defaults.scene_width, defaults.scene_height))
    parser.add_argument("--product-size", type=int, default=defaults.product_size)
    parser.add_argument("--zipf", type=number(0.0), default=defaults.zipf_exponent, help="popularity exponent")
    parser.add_argument("--categories-source", type=Path, default=None,
                        help=f"STL category file to take category sizes from (default: {DEFAULT_CATEGORIES_SOURCE} "
                             "when it exists, else a built-in copy of its counts)")
    add_workers_arg(parser, default=min(2, os.cpu_count() or 1), help="rendering worker processes")
    parser.add_argument("--force", action="store_true", help="replace a synth dataset of another config")
    add_progress_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        categories = load_category_counts(args.categories_source)
        config = SynthConfig(scenes=args.scenes, products=args.products, seed=args.seed,
                             scene_width=args.scene_size[0], scene_height=args.scene_size[1],
                             product_size=args.product_size, zipf_exponent=args.zipf, categories=categories)
        summary = generate(args.out, config, workers=args.workers, force=args.force,
                           progress=not args.no_progress)
    except TrainingError as exc:
        return report(exc, prefix="synth: error")
    status = "already up to date" if summary.reused else f"written in {summary.seconds:.1f} s"
    print(f"{summary.out}: {summary.products} products, {summary.scenes} scenes, {summary.pairs} pairs ({status})")
    for path, _ in config.categories:
        count = summary.products_per_category.get(path, 0)
        print(f"  {short_name(path):<28} {count:>6} products {summary.pairs_per_category.get(path, 0):>7} pairs")
    return 0

