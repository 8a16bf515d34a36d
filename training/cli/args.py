"""Arguments several commands share, defined once: `add_backbone_args(parser)` and friends.

Only argparse here (no torch): `python -m index pipeline` and every training command build their
parsers from these.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_BACKBONE = "efficientnet_lite0"
DEVICES = ("auto", "cpu", "cuda")


def add_data_arg(parser: argparse.ArgumentParser, help: str = "STL dataset directory") -> None:
    parser.add_argument("--data", type=Path, required=True, help=help)


def add_backbone_args(parser: argparse.ArgumentParser, help: str = "frozen backbone (registry name)",
                      choices: Sequence[str] | None = None, weights: bool = True) -> None:
    """--backbone and (unless `weights` is false) --backbone-weights."""
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=choices, help=help)
    if weights:
        parser.add_argument("--backbone-weights", type=Path, default=None, help="weights file for the backbone")


def add_context_arg(parser: argparse.ArgumentParser,
                    help: str = "context margin around a scene crop's bbox") -> None:
    parser.add_argument("--context", type=number(0.0), default=0.1, help=help)


def add_device_arg(parser: argparse.ArgumentParser, strict: bool = False) -> None:
    """--device; `strict` limits it to auto/cpu/cuda (otherwise e.g. cuda:1 passes to resolve_device)."""
    parser.add_argument("--device", default="auto", choices=DEVICES if strict else None, help="auto, cpu or cuda")


def add_cache_arg(parser: argparse.ArgumentParser, required: bool = False,
                  help: str = "feature cache directory (default: <data>/.cache/features)") -> None:
    parser.add_argument("--cache", type=directory, required=required, default=None, help=help)


def add_workers_arg(parser: argparse.ArgumentParser, default: int = 2,
                    help: str = "image decoding workers") -> None:
    parser.add_argument("--workers", type=int, default=default, help=help)


def add_split_seed_arg(parser: argparse.ArgumentParser, help: str = "seed of the scene split") -> None:
    parser.add_argument("--split-seed", type=SEED, default=0, help=help)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_images_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", default=None,
                        help="where the images are when not under DATA/images: a folder or a URI holding scenes/ "
                             "and products/ (s3://bucket/stl, gs://..., https://host/stl; read through fsspec)")


ENGINES = ("local", "ray")  # training.exec.executor.ENGINES, named here without importing torch


def add_engine_args(parser: argparse.ArgumentParser, what: str = "the embedding") -> None:
    """--engine (where `what` runs: this process, or a Ray cluster) and --ray-address: one definition for
    `features`, `train`, `index build` and `index pipeline` (`training.exec.choose.open_executor` takes both)."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help=f"where {what} runs. local: this process (decoding in threads beside it); ray: a Ray "
                             "actor pool, one model per actor (one GPU each when the cluster has GPUs)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS; without either a local Ray starts and "
                             "stops with the job). Nothing connects until a step needs the engine")


def require_positive(**values: int) -> bool:
    """False, with one error line naming the flags, when any value is below 1 (the caller exits 2, as for
    every bad input, instead of argparse's SystemExit)."""
    low = [f"--{name.replace('_', '-')}" for name, value in values.items() if value < 1]
    if low:
        print(f"error: {' and '.join(low)} must be >= 1", file=sys.stderr)
    return not low


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number in [minimum, maximum]. Out of range is argparse's usage error (exit 2,
    naming the flag), not a traceback from wherever the number is first used (a negative seed in numpy)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None,
           above: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite number >= minimum (> minimum with `above`) and <= maximum; nan and inf are
    refused here, before an optimizer or the preprocessing refuses them with a traceback."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low = minimum is not None and (value <= minimum if above else value < minimum)
        if not math.isfinite(value) or low or (maximum is not None and value > maximum):
            bounds = [f"{'>' if above else '>='} {minimum:g}" if minimum is not None else "",
                      f"<= {maximum:g}" if maximum is not None else ""]
            wanted = " and ".join(bound for bound in bounds if bound)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + wanted if wanted else ''}, got {text!r}")
        return value

    return parse


SEED = integer(0, 2**32 - 1)  # numpy's seeds: 0 .. 2**32 - 1
COUNT = integer(1)  # epochs, batch sizes, k


def directory(text: str) -> Path:
    """An argparse `type` for a directory a command writes into: refused up front when something other than a
    directory is in its place (found at the end of a training run, it cost the whole run)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path

