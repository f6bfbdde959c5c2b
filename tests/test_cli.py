import json
import subprocess
import sys

import pytest

from petra.cli import main


def test_help_text_on_every_train_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--preset", "--steps", "--method", "--rank", "--resume", "--stop-after", "--set", "--data"):
        assert flag in out
    for default in (
        "(default: 0.001)",
        "(default: 200)",
        "(default: full)",
        "(default: bible)",
        "(default: the preset's: tiny 16",
        "exit codes: 0 finished",
        "143 SIGTERM",
    ):
        assert default in out
    with pytest.raises(SystemExit) as e:  # a run directory is not optional
        main(["train", "--preset", "tiny"])
    assert e.value.code == 2 and "one of the arguments --out --resume is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "tiny", "--out", "X", "--method", "lora"], "method.name='lora' is not allowed"),
        (["train", "--preset", "tiny", "--out", "X", "--data", "/no/such/file.txt"], "does not exist"),
        (["train", "--preset", "tiny", "--out", "X", "--set", "train.lrr=1"], "unknown option train.lrr"),
        (["train", "--resume", "/no/such/run"], "--resume /no/such/run: the directory does not exist"),
        (["train", "--preset", "tiny", "--out", "X", "--lr", "nan"], "train.lr=nan is not a valid finite number"),
        (["train", "--preset", "tiny", "--out", "/proc/X"], "--out /proc/X: cannot create the directory"),
        (["export", "/tmp", "--hf", "X"], "/tmp is not a petra run directory with a checkpoint"),
    ],
)
def test_bad_input_exits_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "X").exists()  # nothing created before the error


def test_estimate_prints_seed_figure_next_to_ours(capsys):
    assert main(["estimate", "--preset", "1b", "--method", "full,galore", "--rank", "512"]) == 0
    out = capsys.readouterr().out
    assert "4.38" in out and "4.44" in out and "7.48" in out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "petra", "presets"], capture_output=True, text=True)
    assert r.returncode == 0 and "58.07M" in r.stdout


def test_compare_writes_table_plots_report_and_skips_finished_runs(tmp_path, cache_dir, capsys, monkeypatch):
    argv = [
        "compare",
        "--preset",
        "tiny",
        "--methods",
        "full,galore,relora",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--eval-every",
        "4",
        "--out",
        str(tmp_path / "cmp"),
        "--no-progress",
        "--set",
        f"data.cache_dir={cache_dir}",
        "--set",
        "train.val_tokens=512",
    ]
    assert main(argv) == 0
    out = tmp_path / "cmp"
    import json

    rows = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in rows] == ["full", "galore", "relora"]
    assert all(r["status"] == "finished" and r["val_ppl"] > 0 for r in rows)
    assert rows[0]["gap"] == 0 and rows[2]["warm_start"] == "2 steps"
    for r in rows:  # each gap in standard errors of the two validation means
        assert r["val_loss_se"] > 0
        if r["method"] != "full":
            se = (r["val_loss_se"] ** 2 + rows[0]["val_loss_se"] ** 2) ** 0.5
            assert r["gap_se"] == pytest.approx((r["val_loss"] - rows[0]["val_loss"]) / se, abs=0.051)
    table = (out / "comparison.md").read_text()
    assert f"{rows[1]['val_loss']:.4f} ± {rows[1]['val_loss_se']:.4f}" in table and "s.e.)" in table
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


def test_compare_never_reports_old_runs_under_new_settings(tmp_path, cache_dir, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--preset",
        "tiny",
        "--methods",
        "full,galore",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--eval-every",
        "3",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"data.cache_dir={cache_dir}",
        "--set",
        "train.val_tokens=128",
        "--rank",
        "8",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    changed = argv[:6] + ["4"] + argv[7:] + ["--lrs", "galore=0.01"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings" in err and "train.steps: 6 -> 4" in err
    assert "galore (train.lr: 0.001 -> 0.01, train.steps: 6 -> 4" in err and "--rerun-changed" in err
    assert main(changed + ["--rerun-changed"]) == 0
    assert (out / "full.old-1" / "summary.json").is_file() and (out / "galore.old-1" / "config.json").is_file()
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["steps"], r["lr"]) for r in rows] == [(4, 0.001), (4, 0.01)]
    assert "4 steps of batch 4 x 32" in (out / "comparison.md").read_text()
    assert "CPU timings are indicative only" in (out / "comparison.md").read_text()


def test_compare_tunes_each_learning_rate_and_reports_spreads_over_seeds(tmp_path, cache_dir, capsys):
    import json

    from petra.compare import lr_grid, paper_lr

    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--methods", "full,apollo-mini", "--steps", "8", "--batch-size", "4"]
    argv += ["--seq-len", "64", "--eval-every", "4", "--out", str(out), "--no-progress", "--tune", "--tune-points"]
    argv += ["2", "--tune-fraction", "0.5", "--seeds", "2", "--set", f"data.cache_dir={cache_dir}"]
    argv += ["--set", "train.val_tokens=512"]
    assert main(argv) == 0
    sweeps = json.loads((out / "tune" / "sweeps.json").read_text())
    rows = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    for m, sw in sweeps.items():
        grid, losses = sw["grid"], {float(lr): v for lr, v in sw["runs"].items()}
        assert sw["steps"] == 4 and set(lr_grid(paper_lr(m), 2)) <= set(grid) == set(losses)
        assert sw["chosen"] == min(losses, key=losses.get)
        # two points always put the best at an edge: the grid grows that way, at most twice
        assert sw["edge"] == (sw["chosen"] in (grid[0], grid[-1])) and (len(grid) == 4 or not sw["edge"])
        assert all(b == pytest.approx(2 * a, rel=1e-3) for a, b in zip(grid, grid[1:]))
        assert rows[m]["lr"] == sw["chosen"] and rows[m]["seeds"] == 2
        seeds = [json.loads((out / m / f"seed-{k}" / "config.json").read_text())["train"] for k in (0, 1)]
        assert [s["seed"] for s in seeds] == [0, 1] and {s["lr"] for s in seeds} == {sw["chosen"]}
        assert {s["steps"] for s in seeds} == {8}
    # the gap is the mean of the per-seed gaps, with their spread
    ppl = {
        m: [json.loads((out / m / f"seed-{k}" / "summary.json").read_text())["val_ppl"] for k in (0, 1)] for m in rows
    }
    gaps = [a - f for a, f in zip(ppl["apollo-mini"], ppl["full"])]
    mini = rows["apollo-mini"]
    assert mini["gap"] == pytest.approx(sum(gaps) / 2, abs=1e-3)
    assert mini["gap_sd"] == pytest.approx(abs(gaps[0] - gaps[1]) / 2**0.5, abs=1e-3)
    assert mini["gap_significant"] == (abs(mini["gap"]) > mini["gap_sd"])
    table = (out / "comparison.md").read_text()
    assert "## Learning-rate sweeps" in table and f"{rows['full']['lr']:g} (tuned" in table
    assert (out / "tune.png").stat().st_size > 0
    report = (out / "report.html").read_text()  # the notes as HTML: a heading, a table, bold, no markdown
    assert "<h2>Learning-rate sweeps</h2>" in report and "<b>2 seeds per method</b>" in report
    assert "<th>method</th><th>final validation loss" in report and "**" not in report and "|---" not in report
    # a second call trains nothing again
    capsys.readouterr()
    assert main(argv) == 0
    assert "training in" not in capsys.readouterr().out


def test_compare_refuses_bad_seed_and_tune_settings(tmp_path, capsys):
    base = ["compare", "--preset", "tiny", "--methods", "full", "--out", str(tmp_path / "c")]
    assert main([*base, "--seeds", "0"]) == 2
    assert "--seeds 0 must be at least 1" in capsys.readouterr().err
    assert main([*base, "--tune", "--tune-fraction", "1.5"]) == 2
    assert "--tune-fraction 1.5 must be in (0, 1]" in capsys.readouterr().err
