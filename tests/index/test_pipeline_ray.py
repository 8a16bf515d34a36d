"""`index pipeline --engine ray` (Ray in local mode): synth -> train -> build with the features, the catalogue
embedding and the index builds on Ray; a rerun with every step done never connects."""

from __future__ import annotations

from pathlib import Path

import pytest

from index import pipeline
from index.artifact import current_version, open_artifact
from training.io import file_sha256

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

pytestmark = pytest.mark.ray


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
            "--artifacts", str(tmp_path / "artifacts"), "--backbone", "tiny", "--device", "cpu",
            "--scenes", "80", "--products", "40", "--epochs", "1", "--no-detector", *extra]


def test_pipeline_on_ray_publishes_then_a_rerun_needs_no_cluster(tmp_path: Path, capsys) -> None:
    assert pipeline.main(_argv(tmp_path, "--engine", "ray")) == 0
    assert not ray.is_initialized()
    version = current_version(tmp_path / "artifacts")
    artifact = open_artifact(tmp_path / "artifacts")
    assert version is not None and artifact.manifest.provenance.embed_runtime == "ray:auto"
    assert artifact.manifest.embedder.head_sha256 == file_sha256(tmp_path / "work" / "model" / "head.pt")
    assert sum(len(artifact.read_ids(category)) for category in artifact.categories) > 0
    capsys.readouterr()

    # Every step done: an address nobody listens on is never dialled (joining it would hang for minutes).
    assert pipeline.main(_argv(tmp_path, "--engine", "ray", "--ray-address", "192.0.2.1:6379")) == 0
    assert "already serves this model" in capsys.readouterr().out
    assert current_version(tmp_path / "artifacts") == version and not ray.is_initialized()
