import json
import subprocess
import sys

import pytest

from petra.cli import main
from petra.compare import paper_lr
from petra.tuning import lr_grid


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
    assert "reached step 8 earlier, not rerun" in capsys.readouterr().out


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
    changed = argv[:6] + ["4"] + argv[7:] + ["--lrs", "galore=0.02"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "holds runs made with other settings" in err and "train.steps: 6 -> 4" in err
    assert "galore (train.lr: 0.01 -> 0.02, train.steps: 6 -> 4" in err and "--rerun-changed" in err
    assert main(changed + ["--rerun-changed"]) == 0
    assert (out / "full.old-1" / "summary.json").is_file() and (out / "galore.old-1" / "config.json").is_file()
    rows = json.loads((out / "comparison.json").read_text())
    assert [(r["steps"], r["lr"]) for r in rows] == [(4, 0.001), (4, 0.02)]  # full at its paper rate
    assert "4 steps of batch 4 x 32" in (out / "comparison.md").read_text()
    assert "CPU timings are indicative only" in (out / "comparison.md").read_text()


def test_compare_tunes_by_successive_halving_on_the_full_schedule_and_reports_spreads(tmp_path, cache_dir, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--preset", "tiny", "--methods", "full,apollo-mini", "--steps", "8", "--batch-size", "4"]
    argv += ["--seq-len", "64", "--out", str(out), "--no-progress", "--tune", "--tune-points", "3"]
    argv += ["--seeds", "2", "--set", f"data.cache_dir={cache_dir}", "--set", "train.val_tokens=512"]
    assert main(argv) == 0
    sweeps = json.loads((out / "tune" / "sweeps.json").read_text())
    rows = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    for m, sw in sweeps.items():
        assert sw["steps"] == 8 and sw["rung"] == 2  # 8 evaluation points: the quarter is step 2
        runs = {float(lr): v for lr, v in sw["runs"].items()}
        assert set(lr_grid(paper_lr(m), 3)) <= set(runs) and len(runs) <= 5
        # every point ran the full schedule's first quarter; the better ones went on to its end
        for lr, v in runs.items():
            cfg = json.loads((out / "tune" / m / f"lr-{lr:g}" / "config.json").read_text())["train"]
            assert cfg["steps"] == 8 and cfg["lr"] == lr
            summary = json.loads((out / "tune" / m / f"lr-{lr:g}" / "summary.json").read_text())
            assert summary["step"] == (2 if v["stopped"] else 8) and (v["final"] is None) == v["stopped"]
            assert v["curve"][0][0] == 4 * 64 and len(v["curve"]) == (2 if v["stopped"] else 8)  # every step
        going_on = [lr for lr, v in runs.items() if not v["stopped"]]
        at_rung = {lr: v["at_rung"] for lr, v in runs.items()}
        assert len(going_on) == 2 and sorted(at_rung, key=at_rung.get)[:2] == sorted(going_on, key=at_rung.get)
        finals = {lr: runs[lr]["final"] for lr in going_on}
        assert sw["chosen"] == min(finals, key=finals.get) == rows[m]["lr"] and rows[m]["seeds"] == 2
        # the chosen run is the first seed's; the second trains at the chosen rate
        seed1 = json.loads((out / m / "seed-1" / "config.json").read_text())["train"]
        assert (seed1["seed"], seed1["lr"], seed1["steps"]) == (1, sw["chosen"], 8)
    # the gap is the mean of the per-seed gaps, with their spread
    first = {m: out / "tune" / m / f"lr-{sweeps[m]['chosen']:g}" for m in rows}
    ppl = {
        m: [json.loads((d / "summary.json").read_text())["val_ppl"] for d in (first[m], out / m / "seed-1")]
        for m in rows
    }
    gaps = [a - f for a, f in zip(ppl["apollo-mini"], ppl["full"])]
    mini = rows["apollo-mini"]
    assert mini["gap"] == pytest.approx(sum(gaps) / 2, abs=1e-3)
    assert mini["gap_sd"] == pytest.approx(abs(gaps[0] - gaps[1]) / 2**0.5, abs=1e-3)
    assert mini["gap_significant"] == (abs(mini["gap"]) > mini["gap_sd"])
    assert mini["val_loss_sd"] > 0
    table = (out / "comparison.md").read_text()
    assert "## Learning-rate search" in table and f"{rows['full']['lr']:g} (tuned" in table
    assert "(sd, 2 seeds)" in table and "## Ranking at each evaluation point" in table
    assert (out / "tune.png").stat().st_size > 0
    report = (out / "report.html").read_text()  # the notes as HTML: a heading, a table, bold, no markdown
    assert "<h2>Learning-rate search</h2>" in report and "<b>2 seeds per method</b>" in report
    assert "**" not in report and "|---" not in report and "`" not in report
    # a second call trains nothing again
    capsys.readouterr()
    assert main(argv) == 0
    assert "training to step" not in capsys.readouterr().out


def test_compare_refuses_bad_settings_before_any_work(tmp_path, capsys):
    base = ["compare", "--preset", "tiny", "--out", str(tmp_path / "c")]
    for extra, message in (
        (["--methods", "full", "--seeds", "0"], "--seeds 0 must be at least 1"),
        (["--methods", "full", "--tune", "--tune-points", "1"], "--tune-points 1 must be at least 2"),
        (["--methods", "full", "--jobs", "0"], "--jobs 0 must be at least 1"),
        (["--methods", "full", "--tokens", "0"], "--tokens '0' must be more than 0 tokens"),
        (["--methods", "full", "--tokens", "lots"], "or tokens per parameter with x (e.g. 20x)"),
        (["--methods", "full,galore,full"], "--methods names full more than once"),
        (["--methods", "full", "--protocol", "galore-paper", "--preset", "tiny"], "defined for presets 60m"),
    ):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "text, tokens",
    [("20x", 20 * 362_816), ("0.5x", 181_408), ("10M", 10_000_000), ("1.5B", 1_500_000_000), ("2e3", 2000)],
)
def test_tokens_take_counts_and_multiples_of_the_parameters(text, tokens):
    from petra.compare import parse_tokens

    assert parse_tokens(text, 362_816) == tokens


def test_the_galore_paper_protocol_sets_table_2s_setup():
    from petra.compare import method_config, paper_lr, protocol_overrides
    from petra.config import build_config

    cfg = build_config(overrides=protocol_overrides("galore-paper", "60m"))
    t = cfg.train
    assert (t.steps, t.batch_size, cfg.seq_len, cfg.warmup_steps, t.min_lr_ratio, t.grad_clip) == (
        10_000,
        512,
        256,
        1000,
        0.1,
        0.0,
    )
    g = method_config(cfg, "galore", t.steps, paper_lr("galore"))
    assert (g.method.rank, g.method.scale, g.method.update_proj_gap, g.method.projector, g.train.lr) == (
        128,
        0.25,
        200,
        "svd",
        0.01,
    )
    assert protocol_overrides("galore-paper", "1b")["train.steps"] == 100_000
