"""`petra compare`: train several methods on the same data, seed, token budget and schedule
shape, then judge them where it counts, at the end of the budget: the seed article's table,
measured, with a verdict on whether the ranking has settled.

Every run is evaluated at the same token counts (GRID_POINTS of them), so the ranking can be
read at each; verdict.py calls the final ranking settled only if no pair of methods was in the
opposite order in the last half of the budget. `--tune` searches each method's learning rate
by successive halving on the full schedule (tuning.py); `--jobs N` trains N runs side by side
(jobs.py). Each run lives in out/<method> (out/<method>/seed-K with several seeds; a tuned
method's first seed is its chosen run in out/tune/<method>/lr-X). A finished run is not rerun;
an interrupted one resumes; a failed one (out of memory, divergence) is a row marked failed
and the others go on. A run in out made with other settings is never reported under the new
ones: compare stops naming the fields or, with rerun_changed, moves it aside and trains it
again. Every cell comes from the runs' own config.json, summary.json and metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RANKED_METHODS, ConfigError, RunConfig, config_changes, from_dict, method_defaults, replace
from .jobs import Job, read_summary, run_jobs
from .memory import SEED_FIGURES, paper_estimate_gib, shapes
from .metrics import read_metrics
from .parallel import main_process
from .rundir import RunDirectory, compare_entry
from .tuning import Halving, lr_grid, survivors
from .verdict import Measure, judge

GRID_POINTS = 8  # evaluation points every run of a compare shares


def parse_tokens(text: str | None, params: int) -> int | None:
    """--tokens: a count with an optional k, M or B suffix (20M), or a multiple of the
    model's parameters (20x: Chinchilla's 20 tokens per parameter)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]\d+)?\s*([kKmMbBxX]?)\s*", str(text))
    if not m:
        raise ConfigError(
            f"--tokens {text!r} must be a number with an optional k, M or B suffix (e.g. 20M), "
            f"or tokens per parameter with x (e.g. 20x)"
        )
    number = float(str(text).strip().rstrip("kKmMbBxX"))
    unit = m.group(2).lower()
    n = int(number * (params if unit == "x" else {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[unit]))
    if n <= 0:
        raise ConfigError(f"--tokens {text!r} must be more than 0 tokens")
    return n


def parse_lrs(text: str | None, methods: list[str]) -> dict[str, float]:
    """--lrs full=1e-3,galore=1e-2: a peak learning rate per method (the papers tune each)."""
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in methods:
            raise ConfigError(f"--lrs item {item!r} must be METHOD=LR with METHOD one of {', '.join(methods)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--lrs item {item!r}: {value!r} is not a number") from None
    return out


# the peak learning rate of each method's paper runs on the GaLore setup (C4, LLaMA 60M-1B):
# the centre of --tune's grid. Low-rank methods (GaLore, APOLLO, Fira) use 1e-2.
PAPER_LRS = {"full": 1e-3, "full8bit": 1e-3, "relora": 1e-3, "muon": 1e-3, "adam-mini": 1e-3}


# GaLore's Table 2 (arXiv 2403.03507, its scripts/benchmark_c4): sequence 256, batch 512, 10%
# linear warm-up then cosine to 10%, no clipping, no weight decay, an exact SVD for every matrix
# every 200 steps (all at once), ranks 128/256/256/512, each method at its paper rate
# (paper_lr), validated on 10M tokens. With C4 as --data it reproduces the table's setup.
PROTOCOLS = {
    "galore-paper": {
        "steps": {"60m": 10_000, "130m": 20_000, "350m": 60_000, "1b": 100_000},
        "set": {
            "train.batch_size": 512,
            "train.warmup_steps": -1,
            "train.min_lr_ratio": 0.1,
            "train.grad_clip": 0.0,
            "train.weight_decay": 0.0,
            "train.val_tokens": 10_000_000,
            "method.update_proj_gap": 200,
            "method.projector": "svd",
            "method.stagger_refresh": False,
        },
    }
}


def protocol_overrides(name: str, preset: str) -> dict:
    """The config overrides of a named protocol at a preset (the user's own overrides go on top)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol {name!r} is not known; protocols: {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if preset not in p["steps"]:
        raise ConfigError(f"--protocol {name} is defined for presets {', '.join(p['steps'])}, not {preset}")
    return {"preset": preset, "train.steps": p["steps"][preset], **p["set"]}


def paper_lr(method: str) -> float:
    return PAPER_LRS.get(method, 1e-2)


def method_config(
    base: RunConfig,
    method: str,
    steps: int,
    lr: float | None = None,
    explicit: set[str] = frozenset(),
    seed: int | None = None,
) -> RunConfig:
    """The base config with this method. Unless set explicitly, rank and scale are the
    method's paper values, and ReLoRA gets the paper's shape scaled to the run: a quarter
    of the steps full-rank, then three cycles."""
    changes: dict = {"name": method}
    for key, value in method_defaults(method, base.preset).items():
        if f"method.{key}" not in explicit:
            changes[key] = value
    if method == "relora":
        warm = base.method.warm_start_steps if "method.warm_start_steps" in explicit else steps // 4
        interval = base.method.reset_interval if "method.reset_interval" in explicit else max(4, (steps - warm) // 3)
        rw = (
            base.method.restart_warmup_steps
            if "method.restart_warmup_steps" in explicit
            else max(1, min(base.method.restart_warmup_steps, interval // 5))
        )
        changes.update(warm_start_steps=warm, reset_interval=interval, restart_warmup_steps=rw)
    train = {"steps": steps, **({"lr": lr} if lr else {}), **({"seed": seed} if seed is not None else {})}
    return replace(base, method=changes, train=train)


def saved_config(run_dir: Path) -> dict | None:
    p = run_dir / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _move_aside(run_dir: Path) -> Path:
    n = 1
    while (dest := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    run_dir.rename(dest)
    return dest


def check_existing(cfgs: dict[str, RunConfig], out: Path, rerun_changed: bool, log) -> None:
    """Before training them: each run's directory (out / key) must hold nothing or a run
    with the requested settings; with rerun_changed one that differs is moved aside, else
    compare stops naming them."""
    changed = {}
    for m, cfg in cfgs.items():
        saved = saved_config(out / m)
        if saved is not None and (diff := config_changes(saved, cfg.to_dict())):
            changed[m] = diff
    if not changed:
        return
    if not rerun_changed:
        lines = "; ".join(f"{m} ({', '.join(d[:6])}{', ...' if len(d) > 6 else ''})" for m, d in changed.items())
        raise ConfigError(
            f"{out} holds runs made with other settings: {lines}. Rerun them from scratch with "
            f"--rerun-changed (the old runs are kept as METHOD.old-N), or choose another --out"
        )
    for m in changed:
        log(f"{m}: the run in {out / m} was made with other settings; moved to {_move_aside(out / m)}, rerunning")


@dataclass
class MethodPlan:
    """One method's runs: a fixed learning rate, or one searched by successive halving."""

    name: str
    lr: float | None  # None while the search runs
    halving: Halving | None = None
    dirs: list[str] = field(default_factory=list)  # run directory of each seed, once known


def _lr_dir(method: str, lr: float) -> str:
    return f"tune/{method}/lr-{lr:g}"


def _seed_dir(method: str, k: int, seeds: int) -> str:
    return method if seeds == 1 else f"{method}/seed-{k}"


class Progress:
    """Overall progress in steps (of one size for every run), and the time left at the pace so far."""

    def __init__(self, tokens_per_step: int):
        self.clock = time.perf_counter
        self.planned = self.trained = 0
        self.tokens_per_step, self.t0 = tokens_per_step, self.clock()

    def line(self) -> str:
        tps, total = self.tokens_per_step, self.planned * self.tokens_per_step
        if not self.trained:
            return f" ({total / 1e6:.3g}M tokens to train)"
        left = (self.clock() - self.t0) / self.trained * max(0, self.planned - self.trained)
        when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        return f" ({self.trained * tps / 1e6:.3g}M of {total / 1e6:.3g}M tokens trained, about {when} left)"


def _start_step(run_dir: Path) -> int:
    s = read_summary(run_dir)
    return s.get("step", 0) if s and s.get("status") in ("finished", "stopped", "interrupted") else 0


def compare(
    base: RunConfig,
    methods: list[str],
    out: Path,
    tokens: str | None = None,
    lrs: str | None = None,
    explicit: set[str] = frozenset(),
    show_progress: bool = True,
    log=print,
    rerun_changed: bool = False,
    tune: bool = False,
    seeds: int = 1,
    tune_points: int = 5,
    jobs: int = 1,
) -> list[dict]:
    """Train every method (tuned, over seeds), then write the table, plots, report and verdict."""
    if not methods:
        raise ConfigError("--methods is empty; name at least one of full, galore, galore8bit, relora, ...")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ConfigError(f"--methods names {', '.join(dup)} more than once; name each method once")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} must be at least 1")
    if tune and tune_points < 2:
        raise ConfigError(f"--tune-points {tune_points} must be at least 2")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs} must be at least 1")
    if jobs > 1 and not main_process() or jobs > 1 and _under_torchrun():
        raise ConfigError("--jobs runs separate processes; under torchrun use --jobs 1 (every process trains)")
    params = shapes(base.model).total
    per_step = base.train.batch_size * base.seq_len
    budget = parse_tokens(tokens, params)
    steps = max(1, math.ceil(budget / per_step)) if budget else base.train.steps
    every = base.train.eval_every if "train.eval_every" in explicit else max(1, steps // GRID_POINTS)
    base = replace(base, train={"eval_every": every})
    lr_of = parse_lrs(lrs, methods)

    def lr_for(m: str) -> float:  # a method's rate when it is not searched
        return lr_of.get(m) or (base.train.lr if "train.lr" in explicit else paper_lr(m))

    def cfg_for(m: str, lr: float, k: int = 0) -> RunConfig:
        return method_config(base, m, steps, lr, explicit, base.train.seed + k)

    plans: dict[str, MethodPlan] = {}
    for m in methods:
        cfg_for(m, lr_for(m))  # every method's config validated before any training
        if tune and m not in lr_of:
            rung = rung_for(cfg_for(m, paper_lr(m)), every)
            plans[m] = MethodPlan(m, None, Halving(lr_grid(paper_lr(m), tune_points), steps, rung))
        else:
            plans[m] = MethodPlan(m, lr_for(m), dirs=[_seed_dir(m, k, seeds) for k in range(seeds)])
    if not main_process():  # under torchrun every process trains; rank 0 alone reports
        log = lambda *a, **k: None  # noqa: E731

    with RunDirectory(out, lock=main_process(), ours=compare_entry, what="a petra compare"):
        first = {d: cfg_for(p.name, p.lr, k) for p in plans.values() if p.lr is not None for k, d in enumerate(p.dirs)}
        first.update({_lr_dir(m, lr): cfg_for(m, lr) for m, p in plans.items() if p.halving for lr in p.halving.grid})
        if main_process():
            check_existing(first, out, rerun_changed, log)
        log(
            f"compare: {', '.join(methods)} on preset {base.preset} ({params / 1e6:.2f}M parameters), "
            f"{steps} steps x {per_step} tokens = {steps * per_step / 1e6:.3g}M tokens "
            f"({steps * per_step / params:.3g} per parameter) each, {seeds} seed(s), evaluated every {every} steps"
            + ("; learning rates searched by successive halving on the full schedule" if tune else "")
            + (f"; {jobs} runs at a time" if jobs > 1 else "")
        )
        progress = Progress(per_step)

        def job(m: str, key: str, cfg: RunConfig, to: int, label: str, **tags) -> Job:
            start = min(to, _start_step(out / key))
            progress.planned += to - start
            return Job(key, cfg, to, label, tags={"method": m, "from": start, **tags})

        def seed_jobs(p: MethodPlan, ks) -> list[Job]:
            return [
                job(p.name, d, cfg_for(p.name, p.lr, k), steps, f"{p.name} (lr {p.lr:g}, seed {base.train.seed + k})")
                for k, d in ((k, p.dirs[k]) for k in ks)
            ]

        def tune_jobs(p: MethodPlan) -> list[Job]:
            new = []
            for lr, to in p.halving.next_runs():
                key, cfg = _lr_dir(p.name, lr), cfg_for(p.name, lr)
                if main_process() and key not in first:  # a point past the grid's edge
                    check_existing({key: cfg}, out, rerun_changed, log)
                    first[key] = cfg
                what = "to the quarter" if to < steps else "to the end"
                new.append(job(p.name, key, cfg, to, f"{p.name} at lr {lr:g}, {what}", lr=lr))
            if p.halving.extensions and not p.halving.going_on and new:
                log(f"{p.name}: the best rate so far is at the grid's edge; trying {new[0].tags['lr']:g}")
            return new

        def on_done(j: Job, r: dict) -> list[Job]:
            progress.trained += j.to_step - j.tags["from"]
            p = plans[j.tags["method"]]
            if "lr" not in j.tags:  # a seed's run of a fixed or chosen rate
                return []
            ok = r.get("status") in ("finished", "stopped")
            was = p.halving.going_on
            p.halving.report(j.tags["lr"], j.to_step, r.get("loss_at") if ok else None)
            if was is None and p.halving.going_on is not None and p.halving.stopped:
                on, off = (", ".join(f"{x:g}" for x in xs) for xs in (p.halving.going_on, p.halving.stopped))
                log(f"{p.name}: at step {p.halving.rung} going on with lr {on}; stopped {off}")
            new = tune_jobs(p)
            if p.halving.done and p.lr is None:
                return new + _chosen(p)
            return new

        def _chosen(p: MethodPlan) -> list[Job]:
            h = p.halving
            if h.chosen is None:
                log(f"{p.name}: every learning rate of its search failed; see {out / 'tune' / p.name}")
                p.dirs = [_lr_dir(p.name, h.grid[0])]
                return []
            p.lr = h.chosen
            p.dirs = [_lr_dir(p.name, h.chosen)] + [_seed_dir(p.name, k, seeds) for k in range(1, seeds)]
            log(
                f"{p.name}: chose lr {h.chosen:g} (final val loss {h.final[h.chosen]:.4f})"
                + (" -- at the grid's edge: the best rate may lie beyond it" if h.edge else "")
            )
            later = {d: cfg_for(p.name, p.lr, k) for k, d in enumerate(p.dirs) if k}
            if main_process() and later:
                check_existing(later, out, rerun_changed, log)
            return seed_jobs(p, range(1, seeds))

        queue = [j for p in plans.values() if p.halving for j in tune_jobs(p)]
        queue += [j for p in plans.values() if p.lr is not None for j in seed_jobs(p, range(seeds))]
        run_jobs(queue, on_done, out, jobs, show_progress, log, progress.line)
        return _report(base, plans, out, params, seeds, steps, log)


def rung_for(cfg: RunConfig, every: int) -> int:
    """Where successive halving stops the worse half: the evaluation point nearest a quarter of
    the steps; for ReLoRA not before its first merge (its warm start is full rank, the same
    for every method, and tells nothing of its LoRA phase)."""
    steps = cfg.train.steps
    rung = max(every, round(steps / 4 / every) * every)
    if cfg.method.name == "relora":
        first_merge = cfg.method.warm_start_steps + cfg.method.reset_interval
        rung = max(rung, -(-first_merge // every) * every)
    return min(steps, rung)


def _under_torchrun() -> bool:
    import os

    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def val_curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """tokens -> (validation loss, its standard error) at each evaluation of a run."""
    return {
        r["tokens"]: (r["val_loss"], r.get("val_loss_se") or 0.0)
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("val_loss") is not None and math.isfinite(r["val_loss"])
    }


def curves_of(runs: list[Path]) -> dict[int, Measure]:
    """A method's curve over its seeds: the points every seed was evaluated at."""
    each = [val_curve(d) for d in runs]
    common = set.intersection(*(set(c) for c in each)) if each else set()
    return {t: Measure([c[t][0] for c in each], [c[t][1] for c in each]) for t in sorted(common)}


def _report(
    base: RunConfig, plans: dict[str, MethodPlan], out: Path, params: int, seeds: int, steps: int, log
) -> list[dict]:
    """Rows from the runs' own files, the verdict over their curves, and every output."""
    per_method: dict[str, list[dict]] = {}
    cfgs: dict[str, RunConfig] = {}
    for m, p in plans.items():
        per_method[m] = []
        for d in p.dirs:
            s = read_summary(out / d) or {"status": "failed", "reason": "not trained"}
            if p.halving is not None and p.halving.chosen is None:
                s = {"status": "failed", "reason": "every learning rate of the search failed"}
            saved = saved_config(out / d)
            cfg = from_dict(saved) if saved else method_config(base, m, steps, p.lr)
            row = make_row(m, cfg, s, params)
            row["run_dir"] = d
            per_method[m].append(row)
            cfgs.setdefault(m, cfg)
    rows = [aggregate(per_method[m]) if seeds > 1 else per_method[m][0] for m in plans]
    for r in rows:
        h = plans[r["method"]].halving
        if h is not None:
            r["tuned"], r["lr_edge"] = True, h.edge
    sweeps = {m: _sweep_record(p, out) for m, p in plans.items() if p.halving is not None}
    return _outputs(base, rows, per_method, cfgs, out, params, seeds, sweeps, log)


def report_runs(dirs: list[str], out: Path, log=print) -> list[dict]:
    """compare's table, verdict and report of runs trained before (any run directories, e.g.
    of `petra train`), nothing retrained. Each row is named by its method, or by its directory
    where two runs share one; the verdict uses the evaluation points all runs share."""
    paths = [Path(d).expanduser().resolve() for d in dirs]
    if len(paths) < 1:
        raise ConfigError("--runs names no run directory")
    if len(set(paths)) < len(paths):
        raise ConfigError("--runs names a run directory twice; name each run once")
    for p in paths:
        if not (p / "summary.json").is_file() or not (p / "config.json").is_file():
            raise ConfigError(f"--runs {p} is not a petra run that ended (no summary.json and config.json there)")
    cfgs_of = {p: from_dict(json.loads((p / "config.json").read_text())) for p in paths}
    names = [c.method.name for c in cfgs_of.values()]
    per_method: dict[str, list[dict]] = {}
    cfgs: dict[str, RunConfig] = {}
    for p, cfg in cfgs_of.items():
        name = cfg.method.name if names.count(cfg.method.name) == 1 else p.name
        if name in per_method:
            raise ConfigError(f"--runs names two runs called {name!r}; give runs in directories of other names")
        s = read_summary(p) or {}
        row = make_row(name, cfg, s, s.get("params") or shapes(cfg.model).total)
        row["run_dir"] = str(p)
        per_method[name], cfgs[name] = [row], cfg
    first = next(iter(cfgs_of.values()))
    params = shapes(first.model).total
    with RunDirectory(out, lock=main_process(), ours=compare_entry, what="a petra compare"):
        return _outputs(first, [r[0] for r in per_method.values()], per_method, cfgs, out, params, 1, {}, log)


def _outputs(base, rows, per_method, cfgs, out: Path, params: int, seeds: int, sweeps: dict, log) -> list[dict]:
    """Gaps to full rank, the verdict over the runs' curves, and every output file."""
    full = next((r for r in rows if r["method"] == "full" and r["status"] == "finished"), None)
    for r in rows:
        if full and r.get("val_ppl") is not None:
            r["gap"] = round(r["val_ppl"] - full["val_ppl"], 3)
            if seeds > 1 and r is not full:
                paired_gaps(r, per_method[r["method"]], per_method["full"])
            se = math.hypot(r.get("val_loss_se") or 0, full.get("val_loss_se") or 0)
            if r is not full and se > 0 and seeds == 1:  # the loss difference in standard errors: noise below about 2
                r["gap_se"] = round((r["val_loss"] - full["val_loss"]) / se, 1)
    ok = [r["method"] for r in rows if r["status"] == "finished"]
    curves = {m: curves_of([out / r["run_dir"] for r in per_method[m]]) for m in ok}
    verdict = judge(curves)
    passes = max((r.get("passes") or 0 for r in rows), default=0)
    if passes > 1:
        log(
            f"warning: the budget is {passes:.1f} passes over the training data; perplexity then measures "
            f"memorization more than the method. Use a larger corpus (petra data build) or fewer tokens."
        )
    if main_process():
        from . import report

        device = _device(rows)
        if sweeps:
            (out / "tune" / "sweeps.json").write_text(json.dumps(sweeps, indent=2))
            report.save(report.fig_sweeps(sweeps), out / "tune.png", dpi=100)
        report.write_tables(rows, out, base, device, verdict, params, sweeps, seeds, passes)
        report.save(report.fig_val_loss(curves, verdict, params), out / "val_loss.png")
        report.save(report.fig_lr([r for r in rows if (out / r["run_dir"]).is_dir()], out), out / "lr.png")
        report.save(report.fig_memory(rows, cfgs, device.startswith("cuda")), out / "memory.png")
        report.save(report.fig_throughput(rows, device.startswith("cpu")), out / "throughput.png")
        report.write_report(out)
        print((out / "comparison.md").read_text())
        names = ", ".join(
            f for f in ("comparison.md", "comparison.csv", "comparison.json", "report.html") if (out / f).exists()
        )
        log(f"wrote {out}: {names}; plots {', '.join(p for p in report.PLOTS if (out / p).exists())}")
    return rows


def _device(rows: list[dict]) -> str:
    """Where the runs trained, as their summaries say: 'cpu', or 'cuda: NVIDIA H200'."""
    dev = next((r.get("device") for r in rows if r.get("device")), "") or "cpu"
    name = next((r.get("device_name") for r in rows if r.get("device_name")), None)
    return f"cuda: {name}" if dev.startswith("cuda") and name else dev


def _sweep_record(p: MethodPlan, out: Path) -> dict:
    """sweeps.json's entry of one method: every rate's curve, where it stopped, the choice."""
    h = p.halving
    runs = {}
    for lr in h.grid:
        curve = val_curve(out / _lr_dir(p.name, lr))
        runs[f"{lr:g}"] = {
            "at_rung": None if h.at_rung.get(lr, math.inf) == math.inf else h.at_rung[lr],
            "final": None if h.final.get(lr, math.inf) == math.inf else h.final[lr],
            "stopped": lr in h.stopped,
            "curve": sorted([t, v[0]] for t, v in curve.items()),
        }
    return {
        "grid": h.grid,
        "steps": h.steps,
        "rung": h.rung,
        "runs": runs,
        "chosen": h.chosen,
        "edge": h.edge if h.chosen is not None else False,
        "survivors": survivors(len(h.grid)),
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def aggregate(rows: list[dict]) -> dict:
    """One row for a method run with several seeds: means, with the seeds' standard
    deviation of the validation perplexity; failed if any seed failed."""
    out = dict(rows[0])
    out["seeds"] = len(rows)
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        out.update(status=failed[0]["status"], reason=failed[0].get("reason", ""))
    done = [r for r in rows if r.get("val_ppl") is not None]
    if done:
        mean, sd = _mean_sd([r["val_loss"] for r in done])
        out["val_loss"], out["val_loss_sd"], out["val_loss_se"] = round(mean, 5), round(sd, 5), None
        mean, sd = _mean_sd([r["val_ppl"] for r in done])
        out["val_ppl"], out["val_ppl_sd"] = round(mean, 4), round(sd, 4)
        out["tokens_per_s"] = round(_mean_sd([r["tokens_per_s"] for r in done])[0])
        iqrs = [r["tokens_per_s_iqr"] for r in done if r.get("tokens_per_s_iqr")]
        # the spread of every seed's windows together: the lowest quartile to the highest
        out["tokens_per_s_iqr"] = [min(q[0] for q in iqrs), max(q[1] for q in iqrs)] if iqrs else None
        out["peak_mem_gib"] = max(r["peak_mem_gib"] for r in done)
        out["side_by_side"] = max(r.get("side_by_side") or 1 for r in done)
    return out


def paired_gaps(row: dict, runs: list[dict], full_runs: list[dict]) -> None:
    """The gap to full rank seed by seed (the same seed gives both the same initialization
    and data order): its mean, its spread over seeds (standard deviation) and whether the
    mean exceeds the spread (a smaller gap is not told apart from seed noise)."""
    gaps = [r["val_ppl"] - f["val_ppl"] for r, f in zip(runs, full_runs) if r.get("val_ppl") and f.get("val_ppl")]
    if len(gaps) < 2:
        return
    mean, sd = _mean_sd(gaps)
    row.update(gap=round(mean, 3), gap_sd=round(sd, 3), gap_significant=abs(mean) > sd)


def make_row(method: str, cfg: RunConfig, s: dict, params: int) -> dict:
    seed = SEED_FIGURES.get((cfg.preset, method))
    row = {
        "method": method,
        "status": s.get("status", "failed"),
        "reason": s.get("reason", ""),
        "paper_estimate_gib": round(paper_estimate_gib(cfg), 3),
        "seed_gib": seed,
        "rank": s.get("rank", cfg.method.rank if method in RANKED_METHODS else "full"),
        "warm_start": s.get("warm_start"),
        "optimizer": s.get("optimizer"),
        "gap": None,
        "lr": cfg.train.lr,
        "steps": cfg.train.steps,
    }
    if "val_ppl" in s:
        tps, iqr = s.get("tokens_per_s") or 0, s.get("tokens_per_s_iqr")
        row.update(
            val_ppl=round(s["val_ppl"], 3) if s["val_ppl"] else None,
            tokens=s["tokens"],
            tokens_per_param=round(s["tokens"] / params, 4),
            val_loss=s.get("val_loss"),
            val_loss_se=s.get("val_loss_se"),
            passes=round(s["passes"], 3),
            trainable_params=s["trainable_params"],
            optimizer_state_mib=round(s["optimizer_state_bytes"] / 2**20, 2),
            peak_mem_gib=round(s["peak_mem_gib"], 3),
            tokens_per_s=round(tps),
            tokens_per_s_iqr=[round(x) for x in iqr] if iqr else None,
            device=s.get("device", ""),
            device_name=s.get("device_name"),
            side_by_side=s.get("side_by_side", 1),
        )
    return row
