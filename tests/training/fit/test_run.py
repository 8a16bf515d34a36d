"""`fit_head`: the training run as a library call, with a typed result and typed options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures import write_tiny_dataset
from training.errors import DataError
from training.fit.run import CONFIG_FILE, HEAD_FILE, LOG_FILE, FitOptions, fit_head
from training.model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("fit") / "data", {"Apparel|Shoes": 6, "Apparel|Bags": 4},
                              scenes=30, items_per_scene=2)


def test_fit_head_writes_the_run_and_then_finds_it_up_to_date(tiny_data: Path, tmp_path: Path) -> None:
    options = FitOptions(backbone="tiny", epochs=2, batch_size=8, dim=16, hidden_dim=32, split_seed=3)
    out = tmp_path / "run"
    fitted = fit_head(tiny_data, out, options, cache=tmp_path / "cache", device="cpu", workers=0, progress=False)
    assert not fitted.up_to_date and fitted.path == out / HEAD_FILE
    saved = load_checkpoint(fitted.path)
    assert fitted.checkpoint.sha256 == saved.sha256
    assert saved.train_config.split_seed == 3 and saved.train_config.args == options.resolved(tiny_data)
    assert json.loads((out / CONFIG_FILE).read_text()) == options.resolved(tiny_data)
    log = json.loads((out / LOG_FILE).read_text())
    assert log["metrics"] == fitted.metrics == saved.metrics and len(log["history"]) == fitted.metrics["epochs_run"]

    again = fit_head(tiny_data, out, options, cache=tmp_path / "cache", device="cpu", workers=0, progress=False)
    assert again.up_to_date and again.checkpoint.sha256 == saved.sha256 and again.metrics == fitted.metrics


def test_options_resolve_as_the_train_command_did(tiny_data: Path) -> None:
    resolved = FitOptions(backbone="tiny").resolved(tiny_data)
    assert list(resolved) == sorted(resolved) and resolved["data"] == str(tiny_data)
    assert resolved["backbone_weights"] is None and "device" not in resolved and "cache" not in resolved
    json.dumps(resolved)  # JSON-ready: config.json is this dict


def test_bad_options_are_data_errors() -> None:
    with pytest.raises(DataError, match="--epochs must be >= 1.*--dropout must lie in"):
        FitOptions(epochs=0, dropout=1.5)
