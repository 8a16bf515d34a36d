"""Subcommand dispatch for `python -m training` and `python -m index`: each command is a module with
`main(argv)`, imported only when run, so `--help` and light commands never load torch or faiss."""

from __future__ import annotations

import importlib
import logging
import sys

from training.errors import EXIT_INPUT


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in commands:
        print(f"usage: {prog} <command> [options]\n\ncommands:")
        width = max(map(len, commands)) + 1
        for name, (_, help_text) in commands.items():
            print(f"  {name:<{width}} {help_text}")
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss announces each SIMD library it tries at INFO; that is noise in a CLI's output.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    module = importlib.import_module(commands[argv[0]][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except OSError as exc:
        # A path the command cannot read or write (no permission, a file where a folder must be, a full disk) is
        # the environment's, not a bug: one line naming it, like every bad input, not a traceback.
        return report(OSFailure(exc))


class OSFailure(Exception):
    """An OSError as one line: what failed and on which path(s)."""

    exit_code = EXIT_INPUT

    def __init__(self, error: OSError) -> None:
        paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        super().__init__(f"{paths}: {error.strerror}" if paths and error.strerror else str(error))


def report(exc: BaseException, prefix: str = "error") -> int:
    """One line on stderr for an expected failure (a package's root error, or an OSError that reached `dispatch`);
    its documented exit code.

    Every package root (`training.errors.TrainingError`, `index.errors.ArtifactError`) carries an
    `exit_code` class attribute; see training/errors.py for the table.
    """
    print(f"{prefix}: {_message(exc)}", file=sys.stderr)
    return int(getattr(exc, "exit_code", EXIT_INPUT))


def _message(exc: BaseException) -> str:
    """The error's own message. torch's DataLoader re-raises a worker's error with the worker's whole traceback
    as its text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line is
    the message the worker raised."""
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text
