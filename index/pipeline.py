"""`python -m index pipeline`: catalogue -> trained head -> published index, each step skipped when done.

The demo (`make demo`) and the docker `indexer` job both run this. It makes the synthetic catalogue
only when the data directory holds no STL data, so a user's mounted real dataset is used as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from training.data.stl import PAIRS_FILE, UPSTREAM_PAIRS_FILES
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
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (trainer default if unset)")
    return parser


def has_stl_data(data: Path) -> bool:
    return any((data / name).is_file() for name in (PAIRS_FILE, *UPSTREAM_PAIRS_FILES))


def published_head_sha256(artifacts: Path) -> str | None:
    manifest = artifacts / "current" / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("head_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    return run(get_args_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the steps that are not done yet; `args` as parsed by `get_args_parser()`."""
    from index import build
    from training.data.synth import plan as synth
    from training.fit import run as train

    if has_stl_data(args.data):
        print(f"[1/3] dataset: using {args.data}")
    else:
        print(f"[1/3] dataset: generating the synthetic catalogue in {args.data}")
        synth_args = ["--out", str(args.data), "--seed", str(args.seed)]
        synth_args += ["--scenes", str(args.scenes)] if args.scenes is not None else []
        synth_args += ["--products", str(args.products)] if args.products is not None else []
        if synth.main(synth_args):
            return 1

    model_dir = args.work / "model"
    head = model_dir / "head.pt"
    if head.is_file():
        print(f"[2/3] model: using {head}")
    else:
        print(f"[2/3] model: training the head into {model_dir}")
        train_args = ["--data", str(args.data), "--out", str(model_dir), "--cache", str(args.work / "cache"),
                      "--backbone", args.backbone, "--device", args.device, "--seed", str(args.seed)]
        train_args += ["--epochs", str(args.epochs)] if args.epochs is not None else []
        if train.main(train_args) or not head.is_file():
            return 1

    if published_head_sha256(args.artifacts) == file_sha256(head):
        print(f"[3/3] index: {args.artifacts / 'current'} already serves this model")
        return 0
    print(f"[3/3] index: building and publishing into {args.artifacts}")
    return int(build.main(["--data", str(args.data), "--checkpoint", str(head), "--out", str(args.artifacts),
                           "--cache", str(args.work / "cache"), "--device", args.device]) or 0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
