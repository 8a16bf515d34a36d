"""The one exception root of the `index` package, and the kinds callers tell apart.

A CLI of `python -m index` catches `ArtifactError` (and `training.errors.TrainingError`), prints its
message on one line and exits with the kind's `exit_code` (`training.cli.report`); anything else is a
bug and keeps its traceback. The codes are the table in training/errors.py.
"""

from __future__ import annotations

from training.errors import EXIT_MISMATCH, EXIT_REFUSED


class ArtifactError(Exception):
    """Root of every error the index package raises on purpose: an artifact cannot be used or made."""

    # Every index command that fails this way has run and published nothing.
    exit_code = EXIT_REFUSED


class ArtifactMissing(ArtifactError):
    """No version is published under the root, or the requested version does not exist."""


class CorruptArtifact(ArtifactError):
    """A version's manifest or files are unreadable, incomplete or differ from what the manifest records."""


class IndexMismatch(ArtifactError):
    """The artifact was built with another embedder than the one that would query it."""

    exit_code = EXIT_MISMATCH


class Refused(ArtifactError):
    """A build or edit was refused before anything was published (bad products, nothing to index, busy root)."""


def shown_ids(ids: list[str], most: int = 10, width: int = 40) -> str:
    """Ids for an error line: at most `most`, each cut to `width` characters (a fuzzer's 100,000-character id
    was echoed whole), and how many there are in all."""
    cut = [pid if len(pid) <= width else pid[:width - 3] + "..." for pid in ids[:most]]
    return f"{cut}" if len(ids) <= most else f"{cut[:-1] + ['...']} ({len(ids)} in all)"

