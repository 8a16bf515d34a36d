"""The one exception root of the `training` library, and the kinds callers tell apart.

A CLI catches `TrainingError`, prints its message on one line and exits with the kind's `exit_code`
(`training.cli.report`); so does `training.cli.dispatch` for an OSError (a path that cannot be read or
written is the environment's); anything else is a bug and keeps its traceback. The codes, the same in every
command of `python -m training` and `python -m index`:

    0  success
    1  the command ran and refused: a check failed or an edit was refused, nothing was published
    2  bad input: usage, missing or malformed data, unknown names, invalid values
    3  unavailable: something the job needs cannot be had here (weights, device, optional package)
    4  mismatch: parts that do not belong together (checkpoint vs backbone, index vs model)

Each kind also keeps the builtin base it always had (ValueError, RuntimeError, KeyError), so existing
`except ValueError` callers still work.
"""

from __future__ import annotations

EXIT_OK, EXIT_REFUSED, EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_MISMATCH = 0, 1, 2, 3, 4


class TrainingError(Exception):
    """Root of every error the training library raises on purpose."""

    exit_code = EXIT_INPUT


class DataError(TrainingError, ValueError):
    """Input data is malformed or inconsistent (a dataset, a record, an argument value)."""


class UnknownCategory(DataError, KeyError):
    """A category name matches no category, or several; the message lists what would work."""

    def __str__(self) -> str:  # KeyError's str() adds quotes around the message
        return str(self.args[0])


class Unavailable(TrainingError, RuntimeError):
    """Something the job needs cannot be had here (weights file, device, optional package)."""

    exit_code = EXIT_UNAVAILABLE


class ModelMismatch(TrainingError, ValueError):
    """Two parts do not belong together (checkpoint vs backbone, preprocessing, feature cache)."""

    exit_code = EXIT_MISMATCH


def one_line(exc: BaseException) -> str:
    """An exception from a library as one line of a message: its type and its first line (torch's load errors
    run to a dozen lines of advice; some have no text at all, as EOFError on an empty file)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__

