"""Arguments several commands share, defined once: `add_backbone_args(parser)` and friends.

Only argparse here (no torch): `python -m index pipeline` and every training command build their
parsers from these.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
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
    parser.add_argument("--context", type=float, default=0.1, help=help)


def add_device_arg(parser: argparse.ArgumentParser, strict: bool = False) -> None:
    """--device; `strict` limits it to auto/cpu/cuda (otherwise e.g. cuda:1 passes to resolve_device)."""
    parser.add_argument("--device", default="auto", choices=DEVICES if strict else None, help="auto, cpu or cuda")


def add_cache_arg(parser: argparse.ArgumentParser, required: bool = False,
                  help: str = "feature cache directory (default: <data>/.cache/features)") -> None:
    parser.add_argument("--cache", type=Path, required=required, default=None, help=help)


def add_workers_arg(parser: argparse.ArgumentParser, default: int = 2,
                    help: str = "image decoding workers") -> None:
    parser.add_argument("--workers", type=int, default=default, help=help)


def add_split_seed_arg(parser: argparse.ArgumentParser, help: str = "seed of the scene split") -> None:
    parser.add_argument("--split-seed", type=int, default=0, help=help)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


ENGINES = ("local", "ray")  # training.exec.executor.ENGINES, named here without importing torch


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--engine (where the embedding runs: this process, or a Ray cluster) and --ray-address."""
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process (decoding in --workers processes); ray: a Ray actor pool, one "
                             "model per actor (one GPU each when the cluster has GPUs)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS; without either a local Ray starts and "
                             "stops with the job)")
