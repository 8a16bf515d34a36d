"""`python -m training synth`: writes, reuses, refuses to replace other data, rejects bad sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import synth

SMALL = ["--scenes", "2", "--products", "10", "--no-progress", "--workers", "1"]


def test_cli_writes_reuses_and_protects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert synth.main(["--out", str(out), *SMALL]) == 0
    assert "10 products, 2 scenes" in capsys.readouterr().out
    stamp = (out / "pairs.jsonl").stat().st_mtime_ns
    for again in ([], ["--force"]):  # same config: kept as is, the bytes would be the same
        assert synth.main(["--out", str(out), *SMALL, *again]) == 0
        assert "already up to date" in capsys.readouterr().out
        assert (out / "pairs.jsonl").stat().st_mtime_ns == stamp

    assert synth.main(["--out", str(out), *SMALL, "--seed", "5"]) == 2  # another config needs --force
    assert "--force" in capsys.readouterr().err
    assert synth.main(["--out", str(out), *SMALL, "--seed", "5", "--force"]) == 0
    assert json.loads((out / "synth.json").read_text())["config"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging or retired directories left


def test_cli_never_touches_other_data_and_rejects_bad_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert synth.main(["--out", str(precious), *SMALL, "--force"]) == 2
    assert "not a synth dataset" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"
    assert synth.main(["--out", str(tmp_path / "x"), "--products", "3", "--no-progress"]) == 2
    assert "--products must be at least" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
