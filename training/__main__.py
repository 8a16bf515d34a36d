"""`python -m training <command> ...`: each command is a module of `training.cli` with `main(argv)`, imported on use."""

from __future__ import annotations

import sys

from training.cli import dispatch

COMMANDS = {
    "fetch-stl": ("training.cli.fetch_stl", "download STL scene and product images"),
    "synth": ("training.cli.synth", "generate the synthetic STL-format catalogue"),
    "features": ("training.cli.features", "extract and cache frozen-backbone features"),
    "train": ("training.cli.train", "train the embedding head on cached features"),
    "evaluate": ("training.cli.evaluate", "HR@K and binary accuracy of models on the test split"),
    "train-detector": ("training.cli.train_detector", "train the item detector on cached backbone pyramids"),
    "evaluate-detector": ("training.cli.evaluate_detector", "mAP and end-to-end HR@K of the item detector"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m training", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
