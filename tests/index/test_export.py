"""The exported model in a version: made and checked at build, covered by the manifest's checksums,
re-checked by verify, carried by edits, and the numbers a torch-free server gets are the index's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import index.build
from index.artifact import list_versions, open_artifact
from index.build import build
from index.build import main as build_main
from index.manifest import MANIFEST_FILE
from index.remove import main as remove_main
from index.verify import verify
from index.writer import EXPORT_DIR
from training.errors import EXIT_MISMATCH
from training.model.arrays import Preprocess, load_array
from training.model.export import MIN_COSINE
from training.model.runtimes import ExportManifest, ExportMismatch, load_runtime
from training.model.runtimes.base import MANIFEST_FILE as EXPORT_MANIFEST_FILE

SHOES = "Apparel & Accessories|Shoes"


def test_build_publishes_a_checked_export_covered_by_the_manifest(artifacts: Path) -> None:
    artifact = open_artifact(artifacts)
    export = artifact.manifest.export
    assert export is not None and artifact.export_dir == artifact.path / EXPORT_DIR
    assert set(export.files) == {"backbone.onnx", "head.onnx", EXPORT_MANIFEST_FILE}
    assert set(export.checked) == {"onnxruntime", "openvino"}
    assert all(cosine >= MIN_COSINE for cosine in export.checked.values()) and export.min_cosine == MIN_COSINE
    assert ExportManifest.read(artifact.export_dir).fingerprint == artifact.fingerprint()
    assert artifact.check_files() == []
    # The version's manifest.json and the export's own manifest.json are different files.
    assert json.loads((artifact.path / MANIFEST_FILE).read_text())["export"]["folder"] == EXPORT_DIR
    assert artifact.manifest.provenance.embed_runtime == "openvino"  # the CPU build ran the fast runtime


@pytest.mark.parametrize("name", ["openvino", "onnxruntime"])
def test_a_server_without_torch_gets_the_indexed_vectors(artifacts: Path, name: str) -> None:
    artifact = open_artifact(artifacts)
    runtime = load_runtime(name, artifact.export_dir)
    images = {record["id"]: Path(artifact.manifest.provenance.data_root or "") / record["image"]
              for record in artifact.products()}
    ids = artifact.read_ids(SHOES)
    preprocess = Preprocess.from_dict(artifact.manifest.embedder.preprocess)
    batch = np.stack([load_array(images[pid], None, preprocess) for pid in ids])
    vectors = runtime.vectors(batch, "product")
    cosines = np.sum(vectors * artifact.read_vectors(SHOES), axis=1)
    assert cosines.min() >= MIN_COSINE


def test_verify_finds_a_modified_export(artifacts: Path) -> None:
    artifact = open_artifact(artifacts)
    assert verify(artifacts).ok
    graph = artifact.path / EXPORT_DIR / "head.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    problems = verify(artifacts).problems
    assert any(problem.startswith(f"{EXPORT_DIR}/head.onnx: sha256 differs") for problem in problems)


def test_verify_finds_an_export_of_another_model(artifacts: Path) -> None:
    artifact = open_artifact(artifacts)
    raw = json.loads((artifact.export_dir / EXPORT_MANIFEST_FILE).read_text())
    raw["fingerprint"]["head_sha256"] = "another"
    (artifact.export_dir / EXPORT_MANIFEST_FILE).write_text(json.dumps(raw))
    problems = verify(artifacts).problems
    assert any("export/manifest.json: sha256 differs" in problem for problem in problems)


def test_edits_carry_the_export_over(artifacts: Path) -> None:
    before = open_artifact(artifacts)
    assert remove_main(["--artifacts", str(artifacts), "--id", before.read_ids(SHOES)[0]]) == 0
    after = open_artifact(artifacts)
    assert after.version != before.version and after.manifest.export == before.manifest.export
    assert (after.export_dir / "backbone.onnx").stat().st_ino == (before.export_dir / "backbone.onnx").stat().st_ino
    assert after.check_files() == []


def test_no_export_and_no_onnx_build_without_one(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    build(dataset_dir, checkpoint_path, tmp_path / "plain", device="cpu", workers=0, progress=False, export=False,
          runtime="torch")
    plain = open_artifact(tmp_path / "plain")
    assert plain.manifest.export is None and plain.export_dir is None and not (plain.path / EXPORT_DIR).exists()
    assert plain.manifest.provenance.embed_runtime == "torch" and "export" not in json.loads(
        (plain.path / MANIFEST_FILE).read_text())
    monkeypatch.setattr(index.build, "can_export", lambda: False)
    with caplog.at_level(logging.WARNING, logger="index.build"):
        build(dataset_dir, checkpoint_path, tmp_path / "no-onnx", device="cpu", workers=0, progress=False)
    assert open_artifact(tmp_path / "no-onnx").manifest.export is None
    assert "onnx is not installed" in caplog.text


def test_an_export_that_is_not_torch_publishes_nothing(tmp_path: Path, dataset_dir: Path, checkpoint_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def mismatch(*args: object, **kwargs: object) -> dict[str, float]:
        raise ExportMismatch("openvino (f32) vectors differ from torch's: min cosine 0.9990000 < 0.99999")

    monkeypatch.setattr(index.build, "check_export_runtimes", mismatch)
    out = tmp_path / "art"
    assert build_main(["--data", str(dataset_dir), "--checkpoint", str(checkpoint_path), "--out", str(out),
                       "--device", "cpu", "--workers", "0", "--no-progress"]) == EXIT_MISMATCH
    assert "min cosine 0.9990000" in capsys.readouterr().err
    assert list_versions(out) == [] and [p.name for p in out.iterdir()] == [".lock"]  # no leftovers
