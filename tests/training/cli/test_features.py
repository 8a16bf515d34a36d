"""`python -m training features`: extract, report as JSON, exit 2 on bad input."""

from __future__ import annotations

import json

import pytest

from tests.fixtures import write_feature_dataset
from training.cli.features import main
from training.data.stl import STLDataset


@pytest.fixture()
def dataset(tmp_path) -> STLDataset:
    return write_feature_dataset(tmp_path / "data")


def test_cli_extracts_and_reports(dataset, tmp_path, capsys):
    argv = ["--data", str(dataset.root), "--cache", str(tmp_path / "cache"), "--backbone", "tiny",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["computed"] == 8 and report["scene_crops"] == 4 and report["products"] == 4
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 0
    assert main(["--data", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "c"), "--backbone", "tiny"]) == 2
    assert "error:" in capsys.readouterr().err
