"""How close is the analytic memory model (petra estimate / petra plan) to measured peaks?

Reads the rows of benchmark JSON files (benchmarks/bench.py output: preset, impl, micro-batch,
checkpointing, overrides, peak_gib) and the probes of `--probe` runs, rebuilds each row's
config, and prints the estimate beside the measured peak with the relative error:

    python benchmarks/plan_validation.py docs/bench/session4_h100.json docs/bench/session5_h100.json \
        docs/bench_new_methods/*.json docs/plan/probes.json --out docs/plan/validation.json

On a CUDA machine, --probe runs `petra.plan.probe` (the probe `petra plan` uses) on a grid of
configurations first and writes their rows to --probe-out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bench import petra_config  # noqa: E402

from petra.memory import breakdown_gib  # noqa: E402
from petra.plan import probe_in_child  # noqa: E402

# preset, impl (bench.py's names), micro-batch, batch, checkpointing, overrides: configurations
# none of the fitted rows has (other micro-batches, checkpointing, layer-wise without
# accumulation, a sequence of 1024, 7b at micro-batch 8 and 16)
GRID = [
    ("60m", "petra-full:compile", 16, 64, False, {}),
    ("60m", "petra-galore:compile", 64, 64, True, {}),
    ("60m", "petra-relora:compile", 8, 64, False, {"train.seq_len": 1024, "model.max_position_embeddings": 1024}),
    ("350m", "petra-full:compile", 16, 64, False, {}),
    ("350m", "petra-galore8bit-lw:compile", 32, 32, True, {}),
    ("1b", "petra-full:compile", 8, 64, True, {}),
    ("1b", "petra-galore8bit-lw:compile", 16, 16, False, {}),
    ("1b", "petra-fira:compile", 16, 64, False, {}),
    ("7b", "petra-galore8bit-lw:compile", 8, 8, True, {"train.grad_clip": 0}),
    ("7b", "petra-apollo-mini8bit-lw:compile", 16, 16, True, {"train.grad_clip": 0}),
]


def rows_of(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        data = json.loads(Path(f).read_text())
        for r in data if isinstance(data, list) else data.get("rows", []):
            impl = r.get("impl", "")
            # one process, petra's own model; eager rows are left out: training compiles on CUDA
            if impl.startswith("petra") and ":compile" in impl and "@" not in impl and r.get("gpus", 1) == 1:
                # rows of early sessions name no batch or checkpointing: bench.py's defaults then
                out.append({"batch": 64, "activation_checkpointing": False, **r, "source": Path(f).name})
    return out


def config_of(r: dict):
    impl = r["impl"]
    extra = dict(r.get("overrides") or {})
    if "apollo-mini8bit" in impl:  # bench.py has no such impl; a probe row names the method itself
        extra["method.name"] = "apollo-mini8bit"
        impl = impl.replace("apollo-mini8bit", "galore8bit")
    return petra_config(
        impl, r["preset"], r["rank"], r["micro_batch"], r["batch"], ckpt=r["activation_checkpointing"], extra=extra
    )


def compare(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        cfg = config_of(r)
        key = (r["preset"], r["impl"], r["micro_batch"], r["batch"], r["activation_checkpointing"], cfg.seq_len)
        if key in seen:  # the same configuration measured in several sessions: its first row
            continue
        seen.add(key)
        est = breakdown_gib(cfg)["total"]
        out.append(
            {
                "preset": r["preset"],
                "impl": r["impl"],
                "micro_batch": r["micro_batch"],
                "batch": r["batch"],
                "seq_len": cfg.seq_len,
                "checkpointing": r["activation_checkpointing"],
                "measured_gib": round(r["peak_gib"], 2),
                "estimate_gib": round(est, 2),
                "error": round(est / r["peak_gib"] - 1, 3),
                "source": r["source"],
            }
        )
    return out


def probe_grid(out: Path, presets: set[str]) -> None:
    rows = json.loads(out.read_text()) if out.is_file() else []  # a later call adds to an earlier one's
    out.parent.mkdir(parents=True, exist_ok=True)
    for preset, impl, micro, batch, ckpt, extra in GRID:
        if presets and preset not in presets:
            continue
        r = {"preset": preset, "impl": impl, "rank": 0, "micro_batch": micro, "batch": batch}
        r.update(activation_checkpointing=ckpt, overrides=extra, gpus=1)
        cfg = config_of(r)
        r["rank"] = cfg.method.rank
        p = probe_in_child(cfg, cap_gib=1e9)
        print(preset, impl, micro, batch, ckpt, extra, p, flush=True)
        if "error" not in p:
            rows.append({**r, "peak_gib": p["peak_gib"], "reserved_gib": p["reserved_gib"], "step_ms": p["step_ms"]})
        out.write_text(json.dumps(rows, indent=1))  # after each probe: a timeout keeps the rest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--probe", action="store_true", help="probe GRID on this GPU first")
    ap.add_argument("--presets", default="", help="--probe: only GRID's rows of these presets (comma-separated)")
    ap.add_argument("--probe-out", type=Path, default=Path("docs/plan/probes.json"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    files = list(a.files)
    if a.probe:
        probe_grid(a.probe_out, set(filter(None, a.presets.split(","))))
        files.append(str(a.probe_out))
    res = compare(rows_of(files))
    print("| preset | impl | micro-batch x seq | batch | ckpt | measured GiB | estimate GiB | error | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res:
        print(
            f"| {r['preset']} | {r['impl']} | {r['micro_batch']} x {r['seq_len']} | {r['batch']} | "
            f"{'yes' if r['checkpointing'] else 'no'} | {r['measured_gib']} | {r['estimate_gib']} | "
            f"{r['error']:+.1%} | {r['source']} |"
        )
    errs = [abs(r["error"]) for r in res]
    if errs:
        print(
            f"{len(errs)} configurations: |error| median {statistics.median(errs):.1%}, max {max(errs):.1%}; "
            f"estimate under the measured peak in {sum(r['error'] < 0 for r in res)}"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
