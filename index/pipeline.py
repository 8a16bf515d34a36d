"""`python -m index pipeline`: catalogue -> trained head -> published index, each step skipped when done.

The demo (`make demo`) and the docker `indexer` job both run this. It makes the synthetic catalogue
only when the data directory holds no STL data, so a user's mounted real dataset is used as it is.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from index.artifact import current_version, open_artifact
from index.build import build
from index.errors import ArtifactError
from training.cli import report
from training.cli.args import add_backbone_args, add_device_arg
from training.data.stl import PAIRS_FILE, UPSTREAM_PAIRS_FILES
from training.data.synth import SynthConfig, generate, load_category_counts
from training.errors import TrainingError
from training.fit.run import HEAD_FILE, FitOptions, fit_head
from training.io import file_sha256

LOG = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m index pipeline", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="STL dataset directory")
    parser.add_argument("--work", type=Path, default=Path("runs/demo"), help="feature cache and head checkpoint")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="index artifacts root")
    parser.add_argument("--scenes", type=int, default=None, help="synthetic scenes (generator default if unset)")
    parser.add_argument("--products", type=int, default=None, help="synthetic products (generator default if unset)")
    parser.add_argument("--seed", type=int, default=0)
    add_backbone_args(parser, weights=False)
    add_device_arg(parser, strict=True)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (trainer default if unset)")
    return parser


def has_stl_data(data: Path) -> bool:
    return any((data / name).is_file() for name in (PAIRS_FILE, *UPSTREAM_PAIRS_FILES))


def published_head_sha256(artifacts: Path) -> str | None:
    """sha256 of the head checkpoint the current version serves; None when nothing (readable) is published."""
    if current_version(artifacts) is None:
        return None
    try:
        return file_sha256(open_artifact(artifacts).checkpoint_path)
    except (ArtifactError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    return run(get_args_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the steps that are not done yet; `args` as parsed by `get_args_parser()`."""
    try:
        return _run(args)
    except (TrainingError, ArtifactError) as exc:
        return report(exc)


def _run(args: argparse.Namespace) -> int:
    if has_stl_data(args.data):
        print(f"[1/3] dataset: using {args.data}")
    else:
        print(f"[1/3] dataset: generating the synthetic catalogue in {args.data}")
        sizes = {name: value for name, value in (("scenes", args.scenes), ("products", args.products))
                 if value is not None}
        config = SynthConfig(seed=args.seed, categories=load_category_counts(), **sizes)
        generate(args.data, config, workers=min(2, os.cpu_count() or 1), progress=True)

    model_dir = args.work / "model"
    head = model_dir / HEAD_FILE
    if head.is_file():
        print(f"[2/3] model: using {head}")
    else:
        print(f"[2/3] model: training the head into {model_dir}")
        options = FitOptions(backbone=args.backbone, seed=args.seed,
                             **({"epochs": args.epochs} if args.epochs is not None else {}))
        fit_head(args.data, model_dir, options, cache=args.work / "cache", device=args.device)

    if published_head_sha256(args.artifacts) == file_sha256(head):
        print(f"[3/3] index: {args.artifacts / 'current'} already serves this model")
        return 0
    print(f"[3/3] index: building and publishing into {args.artifacts}")
    version = build(data=args.data, checkpoint=head, out=args.artifacts, device=args.device,
                    cache=args.work / "cache")
    print(f"published {version} under {args.artifacts}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
