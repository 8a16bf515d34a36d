"""`train-detector` and `evaluate-detector` end to end on a tiny coloured-box dataset; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures import make_tiny_checkpoint, write_box_dataset
from training.__main__ import COMMANDS
from training.cli import evaluate_detector, train_detector
from training.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_UNAVAILABLE


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", "tiny", "--device", "cpu", "--image-size", "64",
            "--fpn-channels", "32", "--head-convs", "1", "--epochs", "2", "--batch-size", "4", "--workers", "0",
            "--no-progress", "--cache", str(out.parent / "cache"), *extra]


def test_commands_are_registered() -> None:
    assert COMMANDS["train-detector"][0] == "training.cli.train_detector"
    assert COMMANDS["evaluate-detector"][0] == "training.cli.evaluate_detector"


def test_train_then_evaluate(tmp_path: Path, capsys) -> None:
    data = write_box_dataset(tmp_path / "data", scenes=20)
    assert train_detector.main(_train_args(data, tmp_path / "run")) == 0
    assert "mAP@0.5=" in capsys.readouterr().out
    checkpoint = tmp_path / "run" / "detector.pt"
    head = make_tiny_checkpoint(tmp_path / "head.pt")
    argv = ["--data", str(data), "--detector", str(checkpoint), "--head", str(head), "--out", str(tmp_path / "eval"),
            "--device", "cpu", "--no-progress", "--cache", str(tmp_path / "features")]
    assert evaluate_detector.main(argv) == 0
    out = capsys.readouterr().out
    assert "Apparel|Shoes" in out and "end-to-end HR@10" in out
    written = json.loads((tmp_path / "eval" / "detector_metrics.json").read_text())
    assert set(written["test"]["per_category"]) == {"Apparel|Bags", "Apparel|Shoes"}
    assert written["end_to_end"]["hr_given"] == 1.0  # one product per category


def test_exit_codes(tmp_path: Path, capsys) -> None:
    absent = tmp_path / "absent"
    assert train_detector.main(_train_args(absent, tmp_path / "run")) == EXIT_INPUT
    assert evaluate_detector.main(["--data", str(absent), "--detector", str(tmp_path / "d.pt")]) == EXIT_INPUT
    data = write_box_dataset(tmp_path / "data", scenes=4)
    assert evaluate_detector.main(["--data", str(data), "--detector", str(tmp_path / "d.pt")]) == EXIT_INPUT
    assert "does not exist" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"kind": "head"}, foreign)
    assert evaluate_detector.main(["--data", str(data), "--detector", str(foreign), "--device", "cpu"]) == EXIT_MISMATCH
    weights = tmp_path / "no-weights.pth"
    argv = _train_args(data, tmp_path / "run", "--backbone", "efficientnet_lite0", "--backbone-weights", str(weights))
    assert train_detector.main(argv) == EXIT_UNAVAILABLE
    assert train_detector.main(_train_args(data, tmp_path / "run", "--backbone", "nope")) == EXIT_INPUT
