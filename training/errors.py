"""The one exception root of the `training` library, and the kinds callers tell apart.

A CLI catches `TrainingError`, prints its message on one line and exits with the code of its kind
(`training.cli.exit_code`); anything else is a bug and keeps its traceback. Each kind also keeps the
builtin base it always had (ValueError, RuntimeError, KeyError), so existing `except ValueError` callers
still work.
"""

from __future__ import annotations


class TrainingError(Exception):
    """Root of every error the training library raises on purpose."""


class DataError(TrainingError, ValueError):
    """Input data is malformed or inconsistent (a dataset, a record, an argument value)."""


class UnknownCategory(DataError, KeyError):
    """A category name matches no category, or several; the message lists what would work."""

    def __str__(self) -> str:  # KeyError's str() adds quotes around the message
        return str(self.args[0])


class Unavailable(TrainingError, RuntimeError):
    """Something the job needs cannot be had here (weights file, device, optional package)."""


class ModelMismatch(TrainingError, ValueError):
    """Two parts do not belong together (checkpoint vs backbone, preprocessing, feature cache)."""
