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


def test_compare_writes_table_plots_report_and_skips_finished_runs(tmp_path, cache_dir, capsys, monkeypatch):
    argv = ["compare", "--preset", "tiny", "--methods", "full,galore,relora", "--steps", "8", "--batch-size", "4",
            "--seq-len", "64", "--eval-every", "4", "--out", str(tmp_path / "cmp"), "--no-progress",
            "--set", f"data.cache_dir={cache_dir}", "--set", "train.eval_batches=2"]
    assert main(argv) == 0
    out = tmp_path / "cmp"
    import json
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["full", "galore", "relora"]
    assert all(r["status"] == "finished" and r["val_ppl"] > 0 for r in rows)
    assert rows[0]["gap"] == 0 and rows[2]["warm_start"] == "2 steps"
    for f in ("comparison.md", "comparison.csv", "val_loss.png", "lr.png", "memory.png", "throughput.png"):
        assert (out / f).stat().st_size > 0
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # repeating the command reruns nothing; a failing method becomes a row, the others finish
    import petra.train as tr
    real = tr.train

    def flaky(cfg, run_dir, **kw):
        if "galore8bit" in str(run_dir):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, run_dir, **kw)
    monkeypatch.setattr(tr, "train", flaky)
    argv[4] = "full,galore,galore8bit"
    assert main(argv) == 0
    rows = json.loads((out / "comparison.json").read_text())
    assert rows[2]["status"] == "failed" and "out of memory" in rows[2]["reason"]
    assert "finished earlier, not rerun" in capsys.readouterr().out


def test_resume_with_a_different_preset_is_refused(tmp_path, cache_dir, capsys):
    run = str(tmp_path / "r")
    common = ["--no-progress", "--set", f"data.cache_dir={cache_dir}", "--batch-size", "2", "--seq-len", "32"]
    assert main(["train", "--preset", "tiny", "--steps", "4", "--stop-after", "2", "--out", run, *common]) == 0
    assert main(["train", "--resume", run, "--preset", "mini"]) == 2
    assert "uses preset tiny (a different model config)" in capsys.readouterr().err
    assert main(["train", "--resume", run, "--no-progress"]) == 0
