"""`python -m training <command> ...`: each command is a module with `main(argv)`, imported on use."""

from __future__ import annotations

import sys

from training.cli import dispatch

COMMANDS = {
    "fetch-stl": ("training.data.fetch", "download STL scene and product images"),
    "synth": ("training.data.synth.plan", "generate the synthetic STL-format catalogue"),
    "features": ("training.fit.features", "extract and cache frozen-backbone features"),
    "train": ("training.fit.run", "train the embedding head on cached features"),
    "evaluate": ("training.eval.rankers", "HR@K and binary accuracy of models on the test split"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m training", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
