"""One exception root for the index package; each kind carries the exit code of the shared table."""

from __future__ import annotations

import pytest

from index import errors
from index.errors import ArtifactError, ArtifactMissing, CorruptArtifact, IndexMismatch, Refused
from training.cli import report
from training.errors import EXIT_MISMATCH, EXIT_REFUSED


@pytest.mark.parametrize(("kind", "code"), [(ArtifactError, EXIT_REFUSED), (ArtifactMissing, EXIT_REFUSED),
                                            (CorruptArtifact, EXIT_REFUSED), (Refused, EXIT_REFUSED),
                                            (IndexMismatch, EXIT_MISMATCH)])
def test_each_kind_reports_its_exit_code(kind: type[ArtifactError], code: int,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert report(kind("what went wrong")) == code
    assert capsys.readouterr().err == "error: what went wrong\n"


def test_every_kind_derives_from_the_root() -> None:
    kinds = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    assert {ArtifactMissing, CorruptArtifact, IndexMismatch, Refused} <= set(kinds)
    assert all(issubclass(kind, ArtifactError) for kind in kinds)
