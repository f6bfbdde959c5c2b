"""compare's runs side by side (--jobs) and compare's answer to signals."""

import json
import signal
import subprocess
import sys
import time

import pytest

from petra.cli import main
from petra.metrics import read_metrics


def _compare_argv(out, cache_dir, steps="8", methods="full,galore"):
    return [
        "compare",
        "--preset",
        "tiny",
        "--methods",
        methods,
        "--steps",
        steps,
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        f"data.cache_dir={cache_dir}",
        "--set",
        "train.val_tokens=256",
        "--set",
        "train.save_every=0",
    ]


def test_side_by_side_runs_give_the_results_of_one_at_a_time(tmp_path, cache_dir):
    for jobs in (1, 2):
        assert main([*_compare_argv(tmp_path / f"j{jobs}", cache_dir), "--jobs", str(jobs)]) == 0
    one, two = [json.loads((tmp_path / d / "comparison.json").read_text()) for d in ("j1", "j2")]
    assert [r["val_loss"] for r in one] == [r["val_loss"] for r in two]
    for d in ("full", "galore"):  # the whole validation curve, bit for bit
        curves = [
            [r["val_loss"] for r in read_metrics(tmp_path / j / d / "metrics.jsonl") if "val_loss" in r]
            for j in ("j1", "j2")
        ]
        assert curves[0] == curves[1] and len(curves[0]) == 8
    # the side-by-side runs say so, and each logged to its own file
    assert [r["side_by_side"] for r in two] == [2, 2] and [r["side_by_side"] for r in one] == [1, 1]
    assert (tmp_path / "j2" / "logs" / "galore.log").read_text().count("val loss") == 8
    assert "shared, not the method's own speed" in (tmp_path / "j2" / "comparison.md").read_text()


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_signal_stops_the_whole_compare_which_the_same_command_resumes(tmp_path, cache_dir, jobs):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "petra", *_compare_argv(out, cache_dir, "100000"), "--jobs", str(jobs)]
    cmd += ["--log-every", "1", "--eval-every", "100000"]

    def run_until(min_step):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        # side by side, galore must have started too (on a loaded machine it can still be loading)
        started = ("full", "galore") if jobs == 2 else ("full",)
        while time.time() < deadline:
            steps = [[r["step"] for r in read_metrics(out / m / "metrics.jsonl") if "loss" in r] for m in started]
            if steps[0] and steps[0][-1] >= min_step and all(steps):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, text
        assert "compare stopped by signal 15" in text and "the same command resumes it" in text
        return json.loads((out / "full" / "summary.json").read_text())

    first = run_until(3)
    assert first["status"] == "interrupted" and (out / "full" / "checkpoint.pt").is_file()
    galore = out / "galore" / "summary.json"
    if jobs == 1:  # one at a time: the next method never started
        assert not galore.exists()
    else:  # side by side: both saved and stopped
        assert json.loads(galore.read_text())["status"] == "interrupted"
    second = run_until(first["step"] + 3)  # the same command resumes, not restarts
    assert second["step"] > first["step"] and not (out / "comparison.md").exists()
