"""`python -m training <command> ...`: each command is a module with `main(argv)`, imported on use."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "fetch-stl": ("training.fetch", "download STL scene and product images"),
    "synth": ("training.synth", "generate the synthetic STL-format catalogue"),
    "features": ("training.features", "extract and cache frozen-backbone features"),
    "train": ("training.train", "train the embedding head on cached features"),
    "evaluate": ("training.evaluate", "HR@K and binary accuracy of models on the test split"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m training <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
