"""`python -m index verify`: sound artifacts pass, tampered files and foreign checkpoints fail."""

from __future__ import annotations

from pathlib import Path

import pytest

import index.verify
from index.__main__ import main as index_main
from index.artifact import open_artifact
from index.build import build
from index.verify import verify

from .conftest import make_checkpoint


def test_verify_passes_and_reports_recall_of_approximate_indexes(
    tmp_path: Path, dataset_dir: Path, checkpoint_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "art"
    build(dataset_dir, checkpoint_path, root, device="cpu", exact_threshold=6, workers=0, progress=False)
    report = verify(root, checkpoint=checkpoint_path)
    assert report.ok, report.problems
    # Shoes (9) and Pants (7) are above the threshold of 6, Handbags (5) stays exact.
    assert set(report.recall) == {"Apparel & Accessories|Shoes", "Apparel & Accessories|Clothing|Pants"}
    assert all(r == pytest.approx(1.0) for r in report.recall.values())  # one list, probed fully
    assert index_main(["verify", str(root)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_fails_on_tampered_file_and_foreign_checkpoint(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_checkpoint(tmp_path / "other.pt", seed=3)
    assert index_main(["verify", str(artifacts), "--checkpoint", str(other)]) == 1
    assert "sha256 differs from the head" in capsys.readouterr().err
    artifact = open_artifact(artifacts)
    ids_file = artifact.path / artifact.manifest.categories["Apparel & Accessories|Shoes"].ids_file
    ids_file.write_text(ids_file.read_text().replace("p", "q", 1))
    report = verify(artifacts, artifact.version)
    assert not report.ok and any(ids_file.name in problem for problem in report.problems)
    assert index_main(["verify", str(tmp_path / "nothing")]) == 1
    assert "no index version is published" in capsys.readouterr().err


def test_main_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert index_main([]) == 0
    assert index_main(["frobnicate"]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("build", "add", "remove", "verify", "pipeline"))


def test_verify_lets_a_bug_keep_its_traceback(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(index.verify, "check_checkpoint", broken)
    with pytest.raises(ZeroDivisionError):
        index_main(["verify", str(artifacts)])
