"""Step times of GaLore over a whole projector gap: every projector refreshed on one step (as
galore-torch) against each matrix at its own step (method.stagger_refresh, the default).

    python benchmarks/refresh_spread.py --presets 350m,1b --data .carry/prep --out refresh_spread.json

Each setting is one `petra train` run of gap + 15 steps logging every step (so the cycle's
refreshes all fall inside it); the first 3 steps (compilation, the first bases) are left out.
Reports the median, 99th percentile and largest step and the largest over the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(preset: str, stagger: bool, args) -> dict:
    out = Path(args.runs) / f"{preset}-{'staggered' if stagger else 'at-once'}"
    cmd = [
        sys.executable, "-m", "petra", "train", "--preset", preset, "--method", "galore",
        "--steps", str(args.gap + 15), "--batch-size", "64", "--micro-batch-size", str(args.micro[preset]),
        "--update-proj-gap", str(args.gap), "--log-every", "1", "--eval-every", "100000", "--save-every", "0",
        "--no-progress", "--data", args.data, "--set", f"method.stagger_refresh={str(stagger).lower()}",
        "--set", "train.val_tokens=65536", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [(r["step"], r["step_ms"]) for r in rows if "step_ms" in r and r["step"] > 3]
    times = sorted(t for _, t in ms)
    med = statistics.median(times)
    worst_step, worst = max(ms, key=lambda x: x[1])
    return {
        "preset": preset,
        "stagger_refresh": stagger,
        "gap": args.gap,
        "steps_timed": len(ms),
        "median_ms": round(med, 1),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))], 1),
        "max_ms": round(worst, 1),
        "max_step": worst_step,
        "max_over_median": round(worst / med, 3),
        "mean_ms": round(statistics.mean(times), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="350m,1b")
    ap.add_argument("--gap", type=int, default=200)
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", default="/tmp/refresh-spread")
    ap.add_argument("--out", default="refresh_spread.json")
    a = ap.parse_args()
    a.micro = {"60m": 64, "350m": 64, "1b": 32, "7b": 1}
    res = []
    for preset in a.presets.split(","):
        for stagger in (False, True):
            r = run(preset, stagger, a)
            print(json.dumps(r), flush=True)
            res.append(r)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
