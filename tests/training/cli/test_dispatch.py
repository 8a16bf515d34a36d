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


def test_an_os_error_is_one_line_naming_the_path(monkeypatch, capsys) -> None:
    # A path the command cannot write (permission, a file in the way) is the environment's: no traceback.
    import training.data.split as target

    def fails(argv):
        raise PermissionError(13, "Permission denied", "/data/out/.lock")

    monkeypatch.setattr(target, "main", fails, raising=False)
    assert dispatch("prog", {"split": ("training.data.split", "test")}, ["split"]) == 2
    assert capsys.readouterr().err == "error: /data/out/.lock: Permission denied\n"
