"""`python -m index pipeline`: synth -> train -> build, each step skipped when already done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from index import pipeline
from index.artifact import current_version, open_artifact
from training.io import file_sha256


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"),
            "--artifacts", str(tmp_path / "artifacts"), "--backbone", "tiny", "--device", "cpu",
            "--scenes", "80", "--products", "40", "--epochs", "2", "--detector-size", "64", "--detector-epochs", "1",
            *extra]


@pytest.mark.slow
def test_pipeline_builds_once_then_reuses_everything(tmp_path: Path, capsys) -> None:
    assert pipeline.main(_argv(tmp_path)) == 0
    version = current_version(tmp_path / "artifacts")
    head = tmp_path / "work" / "model" / "head.pt"
    assert version is not None and head.is_file()
    assert open_artifact(tmp_path / "artifacts").manifest.embedder.head_sha256 == file_sha256(head)
    pairs_before = (tmp_path / "data" / "pairs.jsonl").read_bytes()
    capsys.readouterr()

    assert pipeline.main(_argv(tmp_path)) == 0
    printed = capsys.readouterr().out
    assert "dataset: using" in printed and "model: using" in printed and "already serves this model" in printed
    assert current_version(tmp_path / "artifacts") == version
    assert (tmp_path / "data" / "pairs.jsonl").read_bytes() == pairs_before


def test_a_mounted_dataset_is_used_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "fashion.json").write_text(json.dumps({"product": "a" * 32, "scene": "b" * 32, "bbox": [0, 0, 1, 1]}))
    assert pipeline.has_stl_data(data)
    assert not pipeline.has_stl_data(tmp_path / "empty")


def test_bad_sizes_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    argv = _argv(tmp_path)
    argv[argv.index("--scenes") + 1] = "0"
    assert pipeline.main(argv) != 0
    assert not (tmp_path / "data").exists() and not (tmp_path / "artifacts").exists()


def test_engine_and_ray_address_reach_training_and_the_build(tmp_path: Path, monkeypatch, capsys) -> None:
    from training.exec.ray_executor import RayExecutor

    seen: dict[str, object] = {}

    def fake_fit_head(data, out, options, **kwargs):
        seen["fit_head"] = kwargs["executor"]
        out.mkdir(parents=True)
        (out / "head.pt").write_bytes(b"a head")

    def fake_build(**kwargs):
        seen["build"] = kwargs["executor"]
        return "v1"

    monkeypatch.setattr(pipeline, "generate", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline, "fit_head", fake_fit_head)
    monkeypatch.setattr(pipeline, "build", fake_build)
    argv = _argv(tmp_path, "--no-detector", "--engine", "ray", "--ray-address", "10.1.2.3:6379")
    assert pipeline.main(argv) == 0
    assert "published v1" in capsys.readouterr().out
    # One executor for the run: the cluster is joined once, by the first step that needs it (none here).
    assert isinstance(seen["fit_head"], RayExecutor) and seen["build"] is seen["fit_head"]
    assert seen["fit_head"].address == "10.1.2.3:6379"
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
