from training.__main__ import COMMANDS
from training.cli import dispatch


def test_help_lists_every_command(capsys) -> None:
    assert dispatch("python -m training", COMMANDS, ["--help"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in COMMANDS)


def test_unknown_command_is_a_usage_error(capsys) -> None:
    assert dispatch("python -m training", COMMANDS, ["nope"]) == 2
    assert "usage: python -m training" in capsys.readouterr().out


def test_runs_the_named_module(monkeypatch) -> None:
    import training.data.split as target

    monkeypatch.setattr(target, "main", lambda argv: 7 if argv == ["--x"] else 0, raising=False)
    assert dispatch("prog", {"split": ("training.data.split", "test")}, ["split", "--x"]) == 7
