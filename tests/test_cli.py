import subprocess
import sys

import pytest

from petra.cli import main


def test_help_text_on_every_train_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--preset", "--steps", "--method", "--rank", "--resume", "--stop-after", "--set", "--data"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "tiny", "--out", "X", "--method", "lora"], "method.name='lora' is not allowed"),
    (["train", "--preset", "tiny", "--out", "X", "--data", "/no/such/file.txt"], "does not exist"),
    (["train", "--preset", "tiny", "--out", "X", "--set", "train.lrr=1"], "unknown option train.lrr"),
    (["train", "--preset", "tiny"], "needs --out"),
    (["train", "--resume", "/no/such/run"], "no checkpoint"),
])
def test_bad_input_exits_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err
    assert not (tmp_path / "X").exists()  # nothing created before the error


def test_estimate_prints_seed_figure_next_to_ours(capsys):
    assert main(["estimate", "--preset", "1b", "--method", "full,galore", "--rank", "512"]) == 0
    out = capsys.readouterr().out
    assert "4.38" in out and "4.44" in out and "7.48" in out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "petra", "presets"], capture_output=True, text=True)
    assert r.returncode == 0 and "58.07M" in r.stdout
