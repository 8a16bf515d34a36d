"""`python -m index <command> ...`: each command is a module with `main(argv)`, imported on use."""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS = {
    "build": ("index.build", "embed the catalogue and publish a new per-category index version"),
    "add": ("index.add", "publish a new version with products added (no full re-embedding)"),
    "remove": ("index.remove", "publish a new version with products removed"),
    "verify": ("index.verify", "check a version's files, checkpoint and approximate-index recall"),
    "pipeline": ("index.pipeline", "synth -> train -> index build, for the demo and the docker indexer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m index <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<9} {help_text}")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
