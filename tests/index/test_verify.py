"""`python -m index verify`: sound artifacts pass, tampered files and foreign checkpoints fail."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import index.verify
from index.__main__ import main as index_main
from index.artifact import Artifact, open_artifact
from index.build import build
from index.catalogue import CATALOGUE_FILE, Catalogue, write_catalogue
from index.manifest import MANIFEST_FILE, write_manifest
from index.verify import verify
from training.io import file_sha256

from .conftest import make_checkpoint

SHOES = "Apparel & Accessories|Shoes"


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
    assert all(name in out for name in ("build", "add", "remove", "update", "verify", "pipeline"))


def test_verify_lets_a_bug_keep_its_traceback(artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(index.verify, "check_checkpoint", broken)
    with pytest.raises(ZeroDivisionError):
        index_main(["verify", str(artifacts)])


def _record_catalogue(artifact_path: Path) -> None:
    """Re-record the catalogue's sha256 in the manifest, as a buggy writer would have: only the content checks
    can tell then."""
    artifact = Artifact.from_dir(artifact_path)
    files = {**artifact.manifest.files, CATALOGUE_FILE: file_sha256(artifact_path / CATALOGUE_FILE)}
    write_manifest(artifact_path / MANIFEST_FILE, replace(artifact.manifest, files=files))


def test_verify_checks_the_catalogue(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = open_artifact(artifacts)
    path = artifact.path / CATALOGUE_FILE
    with Catalogue.open(path) as catalogue:
        rows = list(catalogue.rows())
    original = path.read_bytes()

    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    assert index_main(["verify", str(artifacts)]) == 1
    assert f"{CATALOGUE_FILE}: sha256 differs from the manifest" in capsys.readouterr().err

    # Two shoes swapped: counts and row ranges still fit, but hits would map to the wrong products.
    shoes = [row for row in rows if row.category == SHOES]
    swapped = {shoes[0].product.id: 1, shoes[1].product.id: 0}
    write_catalogue(path, [replace(row, row=swapped.get(row.product.id, row.row)) for row in rows])
    _record_catalogue(artifact.path)
    report = verify(artifacts)
    assert report.problems == [f"{CATALOGUE_FILE}: category {SHOES!r} rows [0, 1] name other products than its "
                               "ids file"]

    write_catalogue(path, [row for row in rows if row is not shoes[-1]])  # the last shoe has no product
    _record_catalogue(artifact.path)
    problems = verify(artifacts).problems
    assert len(problems) == 1 and f"category {SHOES!r} has 8 products (rows 0..7), its index 9 rows" in problems[0]

    path.write_bytes(original)
    _record_catalogue(artifact.path)
    assert verify(artifacts).ok
    # A version built before catalogues existed is fine without one.
    path.unlink()
    files = {n: s for n, s in artifact.manifest.files.items() if n != CATALOGUE_FILE}
    write_manifest(artifact.path / MANIFEST_FILE, replace(artifact.manifest, files=files))
    assert verify(artifacts).ok


def _record(artifact_path: Path, name: str) -> None:
    artifact = Artifact.from_dir(artifact_path)
    files = {**artifact.manifest.files, name: file_sha256(artifact_path / name)}
    write_manifest(artifact_path / MANIFEST_FILE, replace(artifact.manifest, files=files))


@pytest.mark.parametrize(("name", "content", "said"), [
    ("examples.json", '[{"id": 1}]', "examples.json is corrupt (KeyError: 'category')"),
    ("examples.json", '[{"id": "../x", "category": "c", "bbox": [0, 0, 1, 1], "product_id": "p", "scene_id": "s"}]',
     "example id '../x' names no example file"),
    ("products.json", '[{"id": "p0x000", "image": "p0x000.jpg"}]', "products.json is corrupt: product 1 is not an"),
])
def test_verify_reads_the_records_a_forged_checksum_would_pass(artifacts: Path, name: str, content: str,
                                                               said: str) -> None:
    # Found by fuzzing: with the checksums re-recorded, verify said OK and then remove / add / update died on a
    # KeyError, and GET /examples answered 500.
    artifact = open_artifact(artifacts)
    (artifact.path / name).write_text(content)
    _record(artifact.path, name)
    report = verify(artifacts)
    assert not report.ok and any(said in problem for problem in report.problems), report.problems
