"""Every training command maps an expected failure to its kind's exit code; a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import make_tiny_checkpoint, write_tiny_dataset
from training.cli import evaluate, features, synth, train
from training.errors import EXIT_INPUT, EXIT_MISMATCH, EXIT_UNAVAILABLE
from training.fit import run as fit_run
from training.model.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("exit") / "data", {"Apparel|Shoes": 6, "Apparel|Bags": 4},
                              scenes=30, items_per_scene=2)


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", "tiny", "--device", "cpu", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress", "--cache", str(out.parent / "cache"), *extra]


def test_missing_dataset_is_bad_input(tmp_path: Path, capsys) -> None:
    absent = tmp_path / "absent"
    assert train.main(_train(absent, tmp_path / "run")) == EXIT_INPUT
    assert evaluate.main(["--data", str(absent), "--model", "popularity", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    assert features.main(["--data", str(absent), "--cache", str(tmp_path / "c"), "--backbone", "tiny"]) == EXIT_INPUT
    assert synth.main(["--out", str(tmp_path / "s"), "--scenes", "0", "--no-progress"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("cannot open dataset") == 3 and "--scenes must be at least 1" in err


def test_unavailable_backbone_weights(tiny_data: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-weights.pth"
    argv = _train(tiny_data, tmp_path / "run", "--backbone", "efficientnet_lite0", "--backbone-weights", str(missing))
    assert train.main(argv) == EXIT_UNAVAILABLE
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run" / "head.pt").exists()


def test_missing_cuda_is_unavailable(tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = _train(tiny_data, tmp_path / "run")
    argv[argv.index("--device") + 1] = "cuda"
    assert train.main(argv) == EXIT_UNAVAILABLE
    assert "no CUDA GPU" in capsys.readouterr().err


def test_checkpoint_of_another_backbone_is_a_mismatch(tiny_data: Path, tmp_path: Path, capsys) -> None:
    path = make_tiny_checkpoint(tmp_path / "head.pt")
    foreign = load_checkpoint(path)
    foreign.backbone_weights_sha256 = "0" * 64  # as if trained on other weights of the same architecture
    save_checkpoint(path, foreign)
    argv = ["--data", str(tiny_data), "--model", str(path), "--out", str(tmp_path / "eval"), "--device", "cpu",
            "--workers", "0", "--no-progress", "--cache", str(tmp_path / "cache")]
    assert evaluate.main(argv) == EXIT_MISMATCH
    assert "trained on backbone" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_bug_keeps_its_traceback(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not an expected failure")

    monkeypatch.setattr(fit_run, "train_head", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        train.main(_train(tiny_data, tmp_path / "run"))


@pytest.mark.parametrize(("command", "argv", "said"), [
    ("train", ["--seed", "-1"], "argument --seed: must be between 0 and 4294967295"),
    ("train", ["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    ("train", ["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0"),
    ("train", ["--margin", "nan"], "argument --margin: must be a finite number > 0"),
    ("train", ["--context", "inf"], "argument --context: must be a finite number >= 0"),
    ("train-detector", ["--lr", "inf"], "argument --lr: must be a finite number > 0"),
    ("evaluate", ["--seed", "-1"], "argument --seed: must be between"),
    ("evaluate-detector", ["--k", "0"], "argument --k: must be >= 1"),
    ("evaluate-detector", ["--score-threshold", "2"],
     "argument --score-threshold: must be a finite number >= 0 and <= 1"),
    ("synth", ["--zipf", "nan"], "argument --zipf: must be a finite number >= 0"),
])
def test_out_of_range_flags_are_usage_errors_before_any_work(tmp_path: Path, capsys, command: str,
                                                             argv: list[str], said: str) -> None:
    # Found by fuzzing: these reached numpy, torch's optimizer or the preprocessing and died with a traceback,
    # some after the whole run (a negative seed in index build's example choice, after embedding everything).
    from training.__main__ import COMMANDS
    from training.cli import dispatch

    required = {"train": ["--data", str(tmp_path), "--out", str(tmp_path / "o")],
                "train-detector": ["--data", str(tmp_path), "--out", str(tmp_path / "o")],
                "evaluate": ["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "popularity"],
                "evaluate-detector": ["--data", str(tmp_path), "--detector", str(tmp_path / "d.pt")],
                "synth": ["--out", str(tmp_path / "o")]}[command]
    with pytest.raises(SystemExit) as exited:
        dispatch("python -m training", COMMANDS, [command, *required, *argv])
    assert exited.value.code == EXIT_INPUT
    assert said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_output_directory_that_is_a_file_is_refused_up_front(tmp_path: Path, capsys) -> None:
    # Found by fuzzing: `train --out FILE` trained the head and then died writing it.
    in_the_way = tmp_path / "photo.jpg"
    in_the_way.write_bytes(b"not a directory")
    for argv in (_train(tmp_path, in_the_way), [*_train(tmp_path, tmp_path / "run"), "--cache", str(in_the_way)]):
        with pytest.raises(SystemExit) as exited:
            train.main(argv)
        assert exited.value.code == EXIT_INPUT
        assert f"{in_the_way} exists and is not a directory" in capsys.readouterr().err
