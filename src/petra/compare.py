"""`petra compare`: train several methods on the same data, seed, token budget and schedule
shape, then write the seed article's comparison table, measured: comparison.md/.csv/.json,
PNG plots and a self-contained report.html.

Each method runs in out/<method>/. A finished method is not rerun; an interrupted one
resumes from its checkpoint; a failed one (out of memory, divergence) is a row marked
failed with the reason, and the other methods still run. A method whose run in out/ was
made with other settings is never reported under the new ones: compare stops naming the
fields, or, with rerun_changed, moves the old run aside and trains it again. Every cell
of the table comes from the run's own config.json and summary.json.
"""

from __future__ import annotations

import base64
import csv
import gc
import html
import json
import math
import re
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import RANKED_METHODS, RESUMABLE_CHANGES, ConfigError, RunConfig, from_dict, method_defaults, replace
from .memory import SEED_FIGURES, breakdown_gib, paper_estimate_gib
from .metrics import read_metrics
from .parallel import main_process
from .rundir import RunDirectory

COLUMNS = [
    ("method", "method"),
    ("status", "status"),
    ("val_loss", "val loss ± s.e."),
    ("val_ppl", "val ppl"),
    ("gap", "gap to full"),
    ("tokens", "tokens"),
    ("passes", "passes"),
    ("rank", "rank"),
    ("trainable_params", "trainable params"),
    ("optimizer_state_mib", "opt. state MiB (measured)"),
    ("paper_estimate_gib", "memory GiB (papers' conv.)"),
    ("seed_gib", "seed GiB (1B)"),
    ("peak_mem_gib", "peak memory GiB"),
    ("examples_per_s", "examples/s"),
    ("tokens_per_s", "tokens/s"),
    ("lr", "peak lr"),
    ("warm_start", "warm start"),
    ("optimizer", "optimizer"),
]


def parse_tokens(text: str | None) -> int | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise ConfigError(f"--tokens {text!r} must be a number with an optional k, M or B suffix (e.g. 20M)")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


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


def paper_lr(method: str) -> float:
    return PAPER_LRS.get(method, 1e-2)


def lr_grid(centre: float, points: int) -> list[float]:
    """`points` learning rates a factor 2 apart, centred (geometrically) on `centre`."""
    return [float(f"{centre * 2.0 ** (k - (points - 1) / 2):.4g}") for k in range(points)]


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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, requested: RunConfig) -> list[str]:
    """'field: saved -> requested' for every setting in which a run's saved config differs
    from the one requested, except those a resume may change."""
    may = {f"{s}.{k}" for s, k in RESUMABLE_CHANGES}
    old, new = _flat(saved), _flat(requested.to_dict())
    out = []
    for k in sorted(set(old) | set(new)):
        if k in may or old.get(k) == new.get(k):
            continue
        if k == "model.vocab_size" and (old.get(k) or 0) > (new.get(k) or 0):
            continue  # raised by the run to fit its tokenizer
        out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return out


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
        if saved is not None and (diff := config_changes(saved, cfg)):
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


def run_one(cfg: RunConfig, run_dir: Path, show_progress: bool, log) -> dict:
    from .train import train

    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("status") == "finished":
            log(f"{cfg.method.name}: {run_dir} finished earlier, not rerun")
            return done
    resume = checkpoint.exists(run_dir)
    log(
        f"== {cfg.method.name} (lr {cfg.train.lr:g}, seed {cfg.train.seed}): "
        f"{'resuming' if resume else 'training'} in {run_dir}"
    )
    try:
        return train(None if resume else cfg, run_dir, resume=resume, show_progress=show_progress, log=log)
    except ConfigError:
        raise  # bad input is the user's to fix, for every method alike
    except Exception as e:  # out of memory, divergence, ...: a failed row, the others go on
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log(f"{cfg.method.name} failed: {reason}")
        failed = {"status": "failed", "reason": reason}
        if main_process():
            run_dir.mkdir(parents=True, exist_ok=True)
            summary_path.write_text(json.dumps(failed))
        return failed
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    tune_fraction: float = 0.25,
    tune_points: int = 5,
) -> list[dict]:
    if not methods:
        raise ConfigError("--methods is empty; name at least one of full, galore, galore8bit, relora, ...")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds} must be at least 1")
    if tune and not (0 < tune_fraction <= 1 and tune_points >= 2):
        raise ConfigError(
            f"--tune-fraction {tune_fraction} must be in (0, 1] and --tune-points {tune_points} at least 2"
        )
    budget = parse_tokens(tokens)
    per_step = base.train.batch_size * base.seq_len
    steps = max(1, math.ceil(budget / per_step)) if budget else base.train.steps
    lr_of = parse_lrs(lrs, methods)
    cfgs = {m: method_config(base, m, steps, lr_of.get(m), explicit) for m in methods}  # validates all first
    sweeps: dict[str, dict] = {}
    if tune:  # the sweep runs' configs, validated before any training too
        tune_steps = max(2, round(steps * tune_fraction))
        for m in methods:
            if m in lr_of:
                continue  # a learning rate given with --lrs is used as given
            grid = lr_grid(paper_lr(m), tune_points)
            # the builder also makes the rate past an edge, when one is needed
            make = lambda lr, m=m: method_config(base, m, tune_steps, lr, explicit)  # noqa: E731
            sweeps[m] = {"grid": grid, "steps": tune_steps, "runs": {}, "make": make}
            sweeps[m]["cfgs"] = {lr: make(lr) for lr in grid}
    if not main_process():  # under torchrun every process trains; rank 0 alone reports
        log = lambda *a, **k: None  # noqa: E731
    with RunDirectory(out, lock=main_process()):
        log(
            f"compare: {', '.join(methods)} on preset {base.preset}, {steps} steps x {per_step} tokens "
            f"= {steps * per_step / 1e6:.2f}M tokens each, {seeds} seed(s)"
            + (f"; learning rates tuned on {tune_fraction:.0%} of that" if sweeps else "")
        )
        if sweeps:
            _tune(sweeps, out, rerun_changed, show_progress, log)
            for m, sw in sweeps.items():
                cfgs[m] = method_config(base, m, steps, sw["chosen"], explicit)
        return _compare(base, methods, cfgs, out, show_progress, log, rerun_changed, seeds, sweeps, explicit)


def _tune(sweeps: dict[str, dict], out: Path, rerun_changed: bool, show_progress: bool, log, extend: int = 2) -> None:
    """Each method's learning-rate sweep (out/tune/METHOD/lr-X); the chosen rate has the
    lowest final validation loss. A choice at the grid's edge extends the grid by one more
    factor of 2 that way, up to `extend` times; one still at the edge is flagged (the best
    rate may lie beyond)."""
    if main_process():
        first = {f"tune/{m}/lr-{lr:g}": cfg for m, sw in sweeps.items() for lr, cfg in sw["cfgs"].items()}
        check_existing(first, out, rerun_changed, log)
    for i, (m, sw) in enumerate(sweeps.items(), 1):
        for extension in range(extend + 1):
            for lr, cfg in sw["cfgs"].items():
                if lr in sw["runs"]:
                    continue
                log(f"-- sweep of method {i}/{len(sweeps)}: {m} at lr {lr:g} for {sw['steps']} steps")
                s = run_one(cfg, out / f"tune/{m}/lr-{lr:g}", show_progress, log)
                sw["runs"][lr] = s.get("val_loss") if s.get("status") == "finished" else None
            done = {lr: v for lr, v in sw["runs"].items() if v is not None and math.isfinite(v)}
            if not done:
                raise ConfigError(f"every learning rate of {m}'s sweep failed ({sw['grid']}); see {out / 'tune' / m}")
            sw["chosen"] = min(done, key=done.get)
            sw["edge"] = sw["chosen"] in (sw["grid"][0], sw["grid"][-1])
            if not sw["edge"] or extension == extend:
                break
            lr = float(f"{sw['chosen'] * (2 if sw['chosen'] == sw['grid'][-1] else 0.5):.4g}")
            log(f"{m}: the best rate so far, {sw['chosen']:g}, is at the grid's edge; trying {lr:g}")
            sw["grid"] = sorted([*sw["grid"], lr])
            sw["cfgs"][lr] = sw["make"](lr)
            if main_process():
                check_existing({f"tune/{m}/lr-{lr:g}": sw["cfgs"][lr]}, out, rerun_changed, log)
        sw["runs"] = dict(sorted(sw["runs"].items()))
        log(
            f"{m}: chose lr {sw['chosen']:g} (val loss {sw['runs'][sw['chosen']]:.4f})"
            + (" -- at the grid's edge: the best rate may lie beyond it" if sw["edge"] else "")
        )
        del sw["cfgs"], sw["make"]
    if main_process():
        saved = {m: {**sw, "runs": {f"{lr:g}": v for lr, v in sw["runs"].items()}} for m, sw in sweeps.items()}
        (out / "tune" / "sweeps.json").write_text(json.dumps(saved, indent=2))


class ETA:
    """Overall progress of compare's runs in tokens, and the time left at the pace so far."""

    def __init__(self, total_tokens: int):
        self.total, self.tokens, self.t0 = total_tokens, 0, time.perf_counter()

    def done(self, tokens: int, trained: bool = True) -> None:
        """A run's tokens: trained now (they set the pace), or finished earlier (off the total)."""
        if trained:
            self.tokens += tokens
        else:
            self.total -= tokens

    def line(self) -> str:
        if not self.tokens:
            return f" ({self.total / 1e6:.3g}M tokens to train)"
        left = (time.perf_counter() - self.t0) / self.tokens * (self.total - self.tokens)
        when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
        return f" ({self.tokens / 1e6:.3g}M of {self.total / 1e6:.3g}M tokens trained, about {when} left)"


def _tokens(cfg: RunConfig) -> int:
    """The tokens a run trains on."""
    return cfg.train.steps * cfg.train.batch_size * cfg.seq_len


def _run_dirs(methods: list[str], seeds: int) -> list[tuple[str, int, str]]:
    """(method, seed index, run directory relative to out): out/METHOD for one seed,
    out/METHOD/seed-K for several."""
    return [(m, k, m if seeds == 1 else f"{m}/seed-{k}") for m in methods for k in range(seeds)]


def _compare(
    base: RunConfig,
    methods: list[str],
    cfgs: dict[str, RunConfig],
    out: Path,
    show_progress: bool,
    log,
    rerun_changed: bool = False,
    seeds: int = 1,
    sweeps: dict | None = None,
    explicit: set[str] = frozenset(),
) -> list[dict]:
    runs = _run_dirs(methods, seeds)
    run_cfgs = {
        d: cfgs[m]
        if seeds == 1
        else method_config(base, m, cfgs[m].train.steps, cfgs[m].train.lr, explicit, base.train.seed + k)
        for m, k, d in runs
    }
    if main_process():
        check_existing(run_cfgs, out, rerun_changed, log)
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    eta = ETA(sum(_tokens(c) for c in run_cfgs.values()))
    for i, (m, k, d) in enumerate(runs, 1):
        log(f"-- run {i}/{len(runs)}: {m}" + (f", seed {run_cfgs[d].train.seed}" if seeds > 1 else "") + eta.line())
        c = run_cfgs[d]
        earlier = (out / d / "summary.json").is_file()  # a finished run is not trained again
        s = run_one(c, out / d, show_progress, log)
        eta.done(_tokens(c), trained=not (earlier and s.get("status") == "finished"))
        saved = saved_config(out / d)  # the run's own settings, which the table reports
        row = make_row(m, from_dict(saved) if saved else run_cfgs[d], s)
        row["run_dir"] = d
        per_method[m].append(row)
    rows = [aggregate(per_method[m]) for m in methods] if seeds > 1 else [per_method[m][0] for m in methods]
    for r in rows:
        if sweeps and r["method"] in sweeps:
            r["tuned"] = True
            r["lr_edge"] = sweeps[r["method"]]["edge"]
    full = next((r for r in rows if r["method"] == "full" and r["status"] == "finished"), None)
    for r in rows:
        if full and r.get("val_ppl") is not None:
            r["gap"] = round(r["val_ppl"] - full["val_ppl"], 3)
            if seeds > 1 and r is not full:
                paired_gaps(r, per_method[r["method"]], per_method["full"])
            se = math.hypot(r.get("val_loss_se") or 0, full.get("val_loss_se") or 0)
            if r is not full and se > 0 and seeds == 1:  # the loss difference in standard errors: noise below about 2
                r["gap_se"] = round((r["val_loss"] - full["val_loss"]) / se, 1)
    passes = max((r.get("passes") or 0) for r in rows)
    if passes > 1:
        log(
            f"warning: the budget is {passes:.1f} passes over the training data; perplexity then measures "
            f"memorization more than the method. Use a larger corpus (petra data build) or fewer tokens."
        )
    if main_process():
        write_tables(rows, out, base, passes, sweeps or {}, seeds)
        write_plots(rows, cfgs, out, sweeps or {})
        write_report(rows, out, base)
        print((out / "comparison.md").read_text())
    return rows


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
        for key in ("val_loss", "tokens_per_s", "examples_per_s"):
            out[key] = round(_mean_sd([r[key] for r in done])[0], 4)
        mean, sd = _mean_sd([r["val_ppl"] for r in done])
        out["val_ppl"], out["val_ppl_sd"] = round(mean, 4), round(sd, 4)
        out["val_loss_se"] = None
        out["peak_mem_gib"] = max(r["peak_mem_gib"] for r in done)
        out["tokens_per_s_iqr"] = None
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


def make_row(method: str, cfg: RunConfig, s: dict) -> dict:
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
            val_loss=s.get("val_loss"),
            val_loss_se=s.get("val_loss_se"),
            passes=round(s["passes"], 3),
            trainable_params=s["trainable_params"],
            optimizer_state_mib=round(s["optimizer_state_bytes"] / 2**20, 2),
            peak_mem_gib=round(s["peak_mem_gib"], 3),
            tokens_per_s=round(tps),
            tokens_per_s_iqr=[round(x) for x in iqr] if iqr else None,
            device=s.get("device", ""),
            examples_per_s=round(tps / cfg.seq_len, 2),
        )
    return row


def _cell(r: dict, key: str) -> str:
    v = r.get(key)
    if key == "status" and v == "failed":
        return f"failed: {r.get('reason', '')}"
    if v is None:
        return ""
    if key == "val_loss":
        se = r.get("val_loss_se")
        return f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else "")
    if key == "gap" and r.get("gap_sd") is not None:
        return f"{v:+,.3f} ± {r['gap_sd']:.3f}" + ("" if r.get("gap_significant") else " (not significant)")
    if key == "gap" and r.get("gap_se") is not None:
        return f"{v:,.3f} ({r['gap_se']:+.1f} s.e.)"
    if key == "val_ppl" and r.get("val_ppl_sd") is not None:
        return f"{v:,.3f} ± {r['val_ppl_sd']:.3f}"
    if key == "lr" and r.get("tuned"):
        return f"{v:g} (tuned" + (", at the grid's edge)" if r.get("lr_edge") else ")")
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if key == "tokens_per_s" and r.get("tokens_per_s_iqr"):
        lo, hi = r["tokens_per_s_iqr"]
        return f"{v:,} ({lo:,}-{hi:,})"
    if isinstance(v, int) and key != "rank":
        return f"{v:,}"
    return str(v)


def write_tables(
    rows: list[dict], out: Path, base: RunConfig, passes: float, sweeps: dict | None = None, seeds: int = 1
) -> None:
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS] + ["reason"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    steps = sorted({r["steps"] for r in rows})
    lines = [
        f"# petra compare: preset {base.preset}, {'/'.join(map(str, steps))} steps of batch "
        f"{base.train.batch_size} x {base.seq_len}, data {base.data.source!r}, {dev}",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    lines += [
        "",
        "val loss: the mean over the validation windows (train.val_tokens) ± its standard error. "
        "gap to full: validation perplexity minus the full-rank run's (the seed quotes 0.08 for GaLore at 1B "
        "and 0.44 for ReLoRA at 1.3B), with the loss difference in standard errors of both runs (within "
        "about ±2: not told apart from the validation sample's noise; seed-to-seed spread is not in it). "
        "memory (papers' conv.): bf16 weights + optimizer states "
        "(+ GaLore projectors), as the GaLore paper's Table 2 counts; peak memory: measured (device "
        "memory on CUDA, process RSS on CPU). tokens/s: the median of the logging windows after "
        "warm-up, with their interquartile range in brackets.",
    ]
    if seeds > 1:
        lines += [
            "",
            f"**{seeds} seeds per method** (train.seed, train.seed + 1, ...: initialization and data order). "
            "val ppl: the mean ± the standard deviation over seeds; gap to full: the mean of the per-seed "
            "gaps (the same seed for both runs) ± their standard deviation, marked not significant where "
            "the mean is smaller than that spread. Other columns: means over seeds (peak memory: the largest).",
        ]
    if sweeps:
        lines += ["", "## Learning-rate sweeps", ""]
        lines += [
            f"Each method's peak learning rate was chosen by the lowest final validation loss of short runs "
            f"({next(iter(sweeps.values()))['steps']} steps, the same data, seed and schedule shape) on a factor-2 "
            "grid around its paper's rate, extended past an edge up to twice; a choice still at the edge is flagged.",
            "",
            "| method | final validation loss at each peak learning rate | chosen |",
            "|---|---|---|",
        ]
        for m, sw in sweeps.items():
            cells = [f"{lr:g}: " + (f"{v:.4f}" if v is not None else "failed") for lr, v in sw["runs"].items()]
            chosen = f"{sw['chosen']:g}" + (" (edge)" if sw["edge"] else "")
            lines.append(f"| {m} | " + ", ".join(cells) + f" | {chosen} |")
    if any(str(r.get("device", "")).startswith("cpu") for r in rows):
        lines += [
            "",
            "**CPU timings are indicative only**: on a CPU shared with other work the windows of one run "
            "differ several-fold; compare throughput on a GPU (`benchmarks/bench.py`).",
        ]
    if passes > 1:
        lines += [
            "",
            f"**warning**: {passes:.1f} passes over the training data: perplexity measures "
            "memorization more than the method.",
        ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def write_plots(rows: list[dict], cfgs: dict[str, RunConfig], out: Path, sweeps: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the curves of the first seed's run
    metrics = {r["method"]: read_metrics(out / r.get("run_dir", r["method"]) / "metrics.jsonl") for r in rows}
    if sweeps:
        _sweep_plot(plt, sweeps, out / "tune.png")
    _line_plot(plt, metrics, "tokens", "val_loss", 1e6, "tokens (M)", "validation loss", out / "val_loss.png")
    _line_plot(plt, metrics, "step", "lr", 1, "step", "learning rate", out / "lr.png")

    parts = ["weights", "gradients", "optimizer_state", "projectors", "activations"]
    cuda = torch.cuda.is_available()  # bf16 there; fp32 on CPU, where RSS is no device memory
    fig, ax = plt.subplots(figsize=(8.5, 4))
    names = [r["method"] for r in rows]
    est = {m: breakdown_gib(cfgs[m], weight_bytes=2 if cuda else 4) for m in names}
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [est[m][part] for m in names]
        # the largest value in the legend: a segment too thin to see is still accounted for
        # gradients: what the peak holds beyond the activations they replace in backward
        what = "gradients beyond activations" if part == "gradients" else part.replace("_", " ")
        label = f"{what} (up to {max(vals):.3g} GiB)"
        ax.bar(names, vals, bottom=bottom, label=label, edgecolor="white", linewidth=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.3g}", (i, total), ha="center", va="bottom", fontsize=8)
    measured = [r.get("peak_mem_gib") for r in rows]
    if cuda and any(m is not None for m in measured):
        ax.scatter(
            names,
            [m if m is not None else float("nan") for m in measured],
            color="black",
            marker="_",
            s=400,
            label="measured peak (table: peak memory GiB)",
            zorder=3,
        )
    ax.set(
        ylabel="GiB",
        title="memory estimate by part; bar tops: its total as petra estimate gives it (not a table column)"
        + ("" if cuda else "; fp32 on CPU"),
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, [r.get("tokens_per_s") or 0 for r in rows], color="tab:green")
    ax.set(ylabel="tokens/s", title="training throughput")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def _line_plot(
    plt, metrics: dict[str, list[dict]], x: str, y: str, x_unit: float, xlabel: str, ylabel: str, path: Path
) -> None:
    """One line per method of metric y against x, from the runs' metrics.jsonl. Each method
    has its own dash pattern and width (widest first), so lines that coincide (methods with
    one schedule) all stay visible."""
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
    n = len(metrics)
    for i, (m, recs) in enumerate(metrics.items()):
        v = [(r[x] / x_unit, r[y]) for r in recs if y in r]
        if v:
            ax.plot(
                [a for a, _ in v],
                [b for _, b in v],
                linestyle=styles[i % len(styles)],
                linewidth=1.2 + 2.0 * (n - 1 - i) / max(1, n - 1),
                marker="o" if y == "val_loss" else None,
                ms=3,
                label=m,
            )
    ax.set(xlabel=xlabel, ylabel=ylabel, title=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep_plot(plt, sweeps: dict, path: Path) -> None:
    """Final validation loss against peak learning rate, one line per method, the chosen rate starred."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, sw in sweeps.items():
        pts = [(lr, v) for lr, v in sw["runs"].items() if v is not None]
        line = ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=4, label=m)[0]
        ax.plot([sw["chosen"]], [sw["runs"][sw["chosen"]]], marker="*", ms=14, color=line.get_color())
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation loss", title="learning-rate sweeps (* chosen)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown_html(text: str) -> str:
    """The little markdown comparison.md's notes use (paragraphs, ## headings, tables,
    **bold**) as HTML, so the report shows them as the markdown file does."""
    parts = []
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        if block.startswith("## "):
            parts.append(f"<h2>{html.escape(block[3:])}</h2>")
        elif all(line.startswith("|") for line in block.splitlines()):
            rows = [line.strip("|").split("|") for line in block.splitlines() if not line.startswith("|---")]
            tags = ["th"] + ["td"] * (len(rows) - 1)  # the first row is the header
            cells = ["".join(f"<{t}>{html.escape(c.strip())}</{t}>" for c in r) for t, r in zip(tags, rows)]
            parts.append("<table>" + "".join(f"<tr>{c}</tr>" for c in cells) + "</table>")
        else:
            parts.append("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(block)) + "</p>")
    return "".join(parts)


def write_report(rows: list[dict], out: Path, base: RunConfig) -> None:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, k))}</td>" for k, _ in COLUMNS) + "</tr>" for r in rows)
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
        f"</figure>"
        for name in ("val_loss.png", "tune.png", "lr.png", "memory.png", "throughput.png")
        if (out / name).exists()
    )
    note = _markdown_html((out / "comparison.md").read_text().split("\n\n", 2)[-1])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>petra compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}}th{{background:#f3f3f3}}
figure{{display:inline-block;margin:8px}}img{{max-width:560px}}p{{max-width:1100px}}
h2{{font-size:18px}}table+table,p+table{{margin-top:8px}}</style></head><body>
<h1>petra compare: preset {html.escape(base.preset)}</h1>
<table><tr>{head}</tr>{body}</table>{note}{imgs}</body></html>"""
    (out / "report.html").write_text(page)
