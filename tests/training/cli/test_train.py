import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import write_synth_catalogue
from training.cli import train
from training.model.checkpoint import load_checkpoint, load_embedder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_synth_catalogue(tmp_path_factory.mktemp("stl") / "tiny", scenes=60, products=40, seed=1)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", "tiny", "--device", "cpu", "--epochs", "2",
            "--batch-size", "16", "--workers", "0", "--no-progress", "--cache", str(out.parent / "cache"), *extra]


@pytest.mark.slow
def test_train_cli_end_to_end(tiny_data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main(_args(tiny_data, out, "--dim", "16", "--context", "0.2")) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "val (" in printed and "test (" in printed

    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "tiny" and config["dim"] == 16 and config["context"] == 0.2
    log = json.loads((out / "train_log.json").read_text())
    assert [record["epoch"] for record in log["history"]] == [1, 2]
    assert 0.0 <= log["metrics"]["val"]["hr@10"] <= 1.0

    checkpoint = load_checkpoint(out / "head.pt")
    assert checkpoint.backbone_name == "tiny" and checkpoint.train_config.args == config
    assert len(checkpoint.data_fingerprint) == 64
    assert checkpoint.metrics["val"] == log["metrics"]["val"]
    embedder = load_embedder(out / "head.pt", device="cpu")
    assert embedder.dim == 16 and embedder.preprocess.context == 0.2
    vectors = embedder.project(torch.randn(3, embedder.backbone.dim), "scene")
    assert vectors.shape == (3, 16)
    assert torch.allclose(torch.linalg.norm(torch.as_tensor(vectors), dim=1), torch.ones(3), atol=1e-5)

    # Same arguments again: the complete checkpoint is reused, nothing is rewritten.
    modified = (out / "head.pt").stat().st_mtime_ns
    assert train.main(_args(tiny_data, out, "--dim", "16", "--context", "0.2")) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "head.pt").stat().st_mtime_ns == modified

    # --force retrains from the cached features, and the same seed gives the same weights.
    assert train.main(_args(tiny_data, out, "--dim", "16", "--context", "0.2", "--force")) == 0
    again = load_checkpoint(out / "head.pt")
    assert all(torch.equal(checkpoint.state_dict[key], again.state_dict[key]) for key in checkpoint.state_dict)


@pytest.mark.slow
def test_changed_config_retrains(tiny_data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert train.main(_args(tiny_data, out, "--epochs", "1")) == 0
    assert train.main(_args(tiny_data, out, "--epochs", "1", "--separate-heads", "--loss", "l2")) == 0
    assert "up to date" not in capsys.readouterr().out
    checkpoint = load_checkpoint(out / "head.pt")
    assert checkpoint.head_config.separate and checkpoint.train_config.trainer["loss"] == "l2"


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--epochs", "0"], "--epochs must be >= 1"), (["--dropout", "1.5"], "--dropout"),
     (["--backbone", "nope"], "unknown backbone")],
)
def test_bad_arguments_are_clear_errors(tiny_data, tmp_path, capsys, extra, message) -> None:
    assert train.main(_args(tiny_data, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "head.pt").exists()


def test_missing_dataset_is_a_clear_error(tmp_path, capsys) -> None:
    assert train.main(_args(tmp_path / "absent", tmp_path / "run")) == 2
    assert "cannot open dataset" in capsys.readouterr().err


def test_engine_and_ray_address_reach_the_feature_extraction(tiny_data, tmp_path, monkeypatch, capsys) -> None:
    from types import SimpleNamespace

    from training.exec.executor import LocalExecutor
    from training.exec.ray_executor import RayExecutor

    given = []

    def fake_fit_head(data, out, options, **kwargs):
        given.append(kwargs["executor"])
        return SimpleNamespace(up_to_date=True, path=out / "head.pt", metrics={})

    monkeypatch.setattr(train, "fit_head", fake_fit_head)
    assert train.main(_args(tiny_data, tmp_path / "run", "--engine", "ray", "--ray-address", "10.1.2.3:6379")) == 0
    assert train.main(_args(tiny_data, tmp_path / "run")) == 0
    ray_executor, local_executor = given
    assert isinstance(ray_executor, RayExecutor) and ray_executor.address == "10.1.2.3:6379"
    assert isinstance(local_executor, LocalExecutor) and local_executor.workers == 0  # --workers 0
    assert "up to date" in capsys.readouterr().out
