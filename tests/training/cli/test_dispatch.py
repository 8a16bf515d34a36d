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


def test_an_error_from_a_dataloader_worker_is_its_own_message(capsys) -> None:
    # torch's DataLoader re-raises a worker's error with the worker's traceback as its text (found by fuzzing:
    # a bad byte in pairs.jsonl printed a traceback-shaped "error" with --workers 2).
    from training.cli import report
    from training.errors import DataError

    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in <module>\ntraining.errors.DataError: pairs.jsonl:3: "
                        "not UTF-8 text\n")
    assert report(wrapped) == 2
    assert capsys.readouterr().err == "error: pairs.jsonl:3: not UTF-8 text\n"
    report(DataError("plain: message"))
    assert capsys.readouterr().err == "error: plain: message\n"
