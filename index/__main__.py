"""`python -m index <command> ...`: each command is a module with `main(argv)`, imported on use."""

from __future__ import annotations

import sys

from training.cli import dispatch

COMMANDS = {
    "build": ("index.build", "embed the catalogue and publish a new per-category index version"),
    "add": ("index.add", "publish a new version with products added (no full re-embedding)"),
    "remove": ("index.remove", "publish a new version with products removed"),
    "update": ("index.update", "publish a new version with changed product data (no re-embedding)"),
    "verify": ("index.verify", "check a version's files, checkpoint and approximate-index recall"),
    "pipeline": ("index.pipeline", "synth -> train -> index build, for the demo and the docker indexer"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("python -m index", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
