"""compare's outputs: comparison.md/.csv/.json, the PNG plots and a self-contained
report.html, every figure taken from the rows compare built from the runs' own files.

The page leads with the verdict (the final ranking, settled or not, the last crossover), then
two tables a person can read side by side on a screen: quality (loss, perplexity, gap to
full rank, budget) and cost (rank, memory, throughput), then the ranking at every evaluation
point, the learning-rate search, and the plots.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import re
from pathlib import Path

from .config import RunConfig
from .memory import breakdown_gib
from .metrics import read_metrics
from .verdict import EARLY_TOKENS_PER_PARAM, EARLY_WARNING, Verdict, fmt_tokens, ranking_text, summary_lines

QUALITY = [
    ("method", "method"),
    ("status", "status"),
    ("val_loss", "val loss"),
    ("val_ppl", "val ppl"),
    ("gap", "gap to full (ppl)"),
    ("tokens", "tokens"),
    ("tokens_per_param", "tokens / param"),
    ("passes", "passes"),
    ("lr", "peak lr"),
]
COST = [
    ("method", "method"),
    ("rank", "rank"),
    ("trainable_params", "trainable params"),
    ("optimizer_state_mib", "optimizer state MiB"),
    ("paper_estimate_gib", "papers' memory GiB"),
    ("seed_gib", "seed article GiB"),
    ("peak_mem_gib", "peak GiB"),
    ("tokens_per_s", "tokens/s (IQR)"),
    ("warm_start", "warm start"),
    ("optimizer", "optimizer"),
]
COLUMNS = QUALITY + COST[1:]  # the CSV's columns
TEXT_COLUMNS = {"method", "status", "warm_start", "optimizer", "lr"}


def _columns(cols: list[tuple[str, str]], rows: list[dict]) -> list[tuple[str, str]]:
    """The columns with something in them (the seed article's figures exist for two rows at 1B)."""
    return [(k, h) for k, h in cols if k == "method" or any(r.get(k) not in (None, "") for r in rows)]


def cell(r: dict, key: str) -> str:
    v = r.get(key)
    if key == "status" and v == "failed":
        return f"failed: {r.get('reason', '')}"
    if v is None:
        return ""
    if key == "val_loss":
        if r.get("val_loss_sd") is not None:
            return f"{v:.4f} ± {r['val_loss_sd']:.4f} (sd, {r['seeds']} seeds)"
        se = r.get("val_loss_se")
        return f"{v:.4f}" + (f" ± {se:.4f} (s.e.)" if se is not None else "")
    if key == "gap" and r.get("gap_sd") is not None:
        return f"{v:+,.3f} ± {r['gap_sd']:.3f}" + ("" if r.get("gap_significant") else " (not significant)")
    if key == "gap" and r.get("gap_se") is not None:
        return f"{v:+,.3f} ({r['gap_se']:+.1f} s.e.)"
    if key == "val_ppl" and r.get("val_ppl_sd") is not None:
        return f"{v:,.3f} ± {r['val_ppl_sd']:.3f}"
    if key == "lr":
        tuned = " (tuned" + (", at the grid's edge)" if r.get("lr_edge") else ")") if r.get("tuned") else ""
        return f"{v:g}{tuned}"
    if key == "tokens_per_param":
        return f"{v:.3g}"
    if key == "tokens_per_s":
        iqr = r.get("tokens_per_s_iqr")
        text = f"{v:,}" + (f" ({iqr[0]:,}-{iqr[1]:,})" if iqr else "")
        return text + (" †" if (r.get("side_by_side") or 1) > 1 else "")
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and key != "rank":
        return f"{v:,}"
    return str(v)


def _md_table(rows: list[dict], cols: list[tuple[str, str]]) -> list[str]:
    return [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "".join(":---|" if k in TEXT_COLUMNS else "---:|" for k, _ in cols),
        *("| " + " | ".join(cell(r, k).replace("|", "/") for k, _ in cols) + " |" for r in rows),
    ]


def heading(base: RunConfig, rows: list[dict], device: str) -> str:
    steps = "/".join(str(s) for s in sorted({r["steps"] for r in rows}))
    return (
        f"petra compare: preset {base.preset}, {steps} steps of batch {base.train.batch_size} x {base.seq_len} "
        f"tokens, data {base.data.source!r}, {device}"
    )


def write_tables(
    rows: list[dict],
    out: Path,
    base: RunConfig,
    device: str,
    verdict: Verdict,
    params: int,
    sweeps: dict | None = None,
    seeds: int = 1,
    passes: float = 0.0,
) -> None:
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    with (out / "comparison.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k, _ in COLUMNS] + ["reason"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in w.fieldnames})
    budget = max((r.get("tokens") or 0 for r in rows), default=0)
    per_param = budget / params if params else 0.0
    lines = [f"# {heading(base, rows, device)}", ""]
    lines += [
        f"Budget: {fmt_tokens(budget)} tokens per run = **{per_param:.3g} tokens per parameter** "
        f"({params / 1e6:.2f}M parameters; Chinchilla's compute-optimal budget is about 20, the GaLore "
        "paper's 60M runs about 20)."
    ]
    if per_param < EARLY_TOKENS_PER_PARAM:
        lines += ["", f"**Warning, {EARLY_WARNING}.**"]
    else:
        lines += [
            "",
            f"Past early training (at least {EARLY_TOKENS_PER_PARAM:g} token per parameter)"
            + ("." if per_param >= 20 else "; a longer budget (up to --tokens 20x) may still change the ranking."),
        ]
    lines += ["", "## Verdict", "", *summary_lines(verdict, params)]
    lines += ["", "## Quality", "", *_md_table(rows, _columns(QUALITY, rows))]
    lines += ["", "## Cost", "", *_md_table(rows, _columns(COST, rows))]
    notes = [
        "val loss: the mean over the validation windows (train.val_tokens) ± its standard error (s.e.); with "
        "several seeds the mean over seeds ± their standard deviation (sd). gap to full: validation perplexity "
        "minus the full-rank run's (the seed article quotes 0.08 for GaLore at 1B and 0.44 for ReLoRA at "
        "1.3B); with one seed, the loss difference in standard errors of both runs (within about ±2: not told "
        "apart from the validation sample's noise; seed-to-seed spread is not in it).",
        "optimizer state: measured, the bytes of the optimizer's tensors. papers' memory: bf16 weights + "
        "optimizer states (+ GaLore projectors), as the GaLore paper's Table 2 counts, computed. peak: "
        "measured (device memory on CUDA, process RSS on CPU). tokens/s: the median of the logging windows "
        "after warm-up, with their interquartile range (IQR).",
    ]
    if any((r.get("side_by_side") or 1) > 1 for r in rows):
        most = max(r.get("side_by_side") or 1 for r in rows)
        notes.append(
            f"† trained side by side with other runs on the same machine (up to {most} at once, `--jobs`): "
            "their tokens/s is shared, not the method's own speed. Measure speed with `--jobs 1` or "
            "`benchmarks/bench.py`."
        )
    if seeds > 1:
        notes.append(
            f"**{seeds} seeds per method** (train.seed, train.seed + 1, ...: initialization and data order). "
            "val ppl: the mean ± the standard deviation over seeds; gap to full: the mean of the per-seed gaps "
            "(the same seed for both runs) ± their standard deviation, marked not significant where the mean "
            "is smaller than that spread. Other columns: means over seeds (peak memory: the largest)."
        )
    if device.startswith("cpu"):
        notes.append(
            "**CPU timings are indicative only**: on a CPU shared with other work the windows of one run "
            "differ several-fold; compare throughput on a GPU (`benchmarks/bench.py`)."
        )
    if passes > 1:
        notes.append(
            f"**Warning**: {passes:.1f} passes over the training data: perplexity measures memorization "
            "as much as the method."
        )
    lines += ["", *("\n\n".join(notes).split("\n"))]
    lines += ["", "## Ranking at each evaluation point", ""]
    lines += [
        "Every run is evaluated at the same token counts. Best first; `=` joins methods whose losses differ by "
        "less than their spread (a tie). The verdict is settled if no pair is in the opposite order within "
        "the last half of the budget.",
        "",
        "| tokens | tokens / param | ranking | losses |",
        "|---:|---:|:---|:---|",
    ]
    for t, groups in zip(verdict.grid, verdict.rankings):
        losses = ", ".join(f"{m} {verdict.means[t][m]:.4f}" for g in groups for m in g)
        late = " (last half)" if 2 * t >= verdict.grid[-1] else ""
        lines.append(f"| {fmt_tokens(t)}{late} | {t / params:.3g} | {ranking_text(groups)} | {losses} |")
    if sweeps:
        lines += ["", "## Learning-rate search", ""]
        lines += [
            "Each method's peak learning rate was searched by successive halving on the full schedule: every "
            "rate of a factor-2 grid around the paper's starts the full-length run; at a quarter of the steps "
            "(ReLoRA: after its first merge) the grid grows past an edge that is best (at most twice), then the "
            "worse half stops and the rest train to the end, where the lowest final validation loss is chosen. "
            "The chosen run is the method's run for the first seed; a choice at the grid's edge is flagged.",
            "",
            "| method | judged at step | val loss there (✗: stopped) | final val loss | chosen |",
            "|:---|---:|:---|:---|:---|",
        ]
        for m, sw in sweeps.items():
            runs = sw["runs"]
            rung = ", ".join(f"{lr}: {_loss(v['at_rung'])}" + (" ✗" if v["stopped"] else "") for lr, v in runs.items())
            final = ", ".join(f"{lr}: {_loss(v['final'])}" for lr, v in runs.items() if not v["stopped"])
            chosen = "all failed" if sw["chosen"] is None else f"{sw['chosen']:g}" + (" (edge)" if sw["edge"] else "")
            lines.append(f"| {m} | {sw['rung']} of {sw['steps']} | {rung} | {final} | {chosen} |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


def _loss(v: float | None) -> str:
    return "failed" if v is None else f"{v:.4f}"


# -- plots --------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]


def save(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure as PNG, whole (nothing cut at its edges), and free it."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    _pyplot().close(fig)


def fig_val_loss(curves: dict[str, dict[int, object]], verdict: Verdict, params: int):
    """Validation loss against tokens for every method: the mean over seeds, a band of ±1 sd
    where there are several; the last crossover marked; the last half of the budget (where
    the verdict is judged) shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.4))
    n = len(curves)
    for i, (m, points) in enumerate(curves.items()):
        ts = sorted(points)
        if not ts:
            continue
        mean = [points[t].mean for t in ts]
        x = [t / 1e6 for t in ts]
        line = ax.plot(
            x,
            mean,
            linestyle=STYLES[i % len(STYLES)],
            linewidth=1.2 + 1.6 * (n - 1 - i) / max(1, n - 1),
            marker="o",
            ms=3,
            label=m,
        )[0]
        sds = [points[t].sd for t in ts]
        if all(s is not None for s in sds):
            ax.fill_between(
                x,
                [a - s for a, s in zip(mean, sds)],
                [a + s for a, s in zip(mean, sds)],
                color=line.get_color(),
                alpha=0.18,
                linewidth=0,
            )
    if verdict.grid:
        end = verdict.grid[-1] / 1e6
        ax.axvspan(end / 2, end, color="0.5", alpha=0.07, label="last half (verdict)")
        last = verdict.last_crossover
        if last is not None:
            ax.axvline(last.after / 1e6, color="0.3", linestyle=":", linewidth=1, label="last crossover")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("validation loss")
    seeds = max((len(p.losses) for pts in curves.values() for p in pts.values()), default=1)
    ax.set_title("validation loss" + (f" (mean of {seeds} seeds, band ±1 sd)" if seeds > 1 else ""), fontsize=10)
    top = ax.secondary_xaxis("top", functions=(lambda x: x * 1e6 / params, lambda y: y * params / 1e6))
    top.set_xlabel("tokens per parameter", fontsize=9)
    _zoom_to_late(ax, [[points[t].mean for t in sorted(points)] for points in curves.values()])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _zoom_to_late(ax, series: list[list[float]]) -> None:
    """The y range of every curve after its first evaluation: the first point's loss, far
    above the rest, would squash the curves that decide the ranking."""
    late = [y for ys in series for y in ys[1:]]
    if len(late) >= 2:
        lo, hi = min(late), max(late)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def fig_sweeps(sweeps: dict):
    """One panel per tuned method: every rate's validation curve, ✗ where it was stopped, the chosen one thick."""
    plt = _pyplot()
    n = len(sweeps)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (m, sw) in zip(axes.flat, sweeps.items()):
        for lr, v in sw["runs"].items():
            pts = v["curve"]
            if not pts:
                continue
            chosen = sw["chosen"] is not None and float(lr) == sw["chosen"]
            line = ax.plot(
                [t / 1e6 for t, _ in pts],
                [y for _, y in pts],
                linewidth=2.6 if chosen else 1.0,
                label=f"{lr}" + (" (chosen)" if chosen else ""),
            )[0]
            if v["stopped"]:
                ax.plot([pts[-1][0] / 1e6], [pts[-1][1]], marker="x", ms=8, color=line.get_color())
        ax.set_title(m, fontsize=10)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.set_xlabel("tokens (M)", fontsize=8)
        ax.set_ylabel("validation loss", fontsize=8)
        _zoom_to_late(ax, [[y for _, y in v["curve"]] for v in sw["runs"].values()])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="peak lr", title_fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "learning-rate search: successive halving on the full schedule (✗: stopped at the quarter)", fontsize=10
    )
    fig.tight_layout()
    return fig


def fig_lr(rows: list[dict], out: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    n = len(rows)
    for i, r in enumerate(rows):
        recs = [x for x in read_metrics(out / r["run_dir"] / "metrics.jsonl") if "lr" in x]
        ax.plot(
            [x["step"] for x in recs],
            [x["lr"] for x in recs],
            linestyle=STYLES[i % len(STYLES)],
            linewidth=1.2 + 1.6 * (n - 1 - i) / max(1, n - 1),
            label=r["method"],
            marker="o" if len(recs) < 4 else None,  # a short run logs a point or two
        )
    ax.set(xlabel="step", ylabel="learning rate")
    ax.set_title("learning-rate schedule (first seed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig_memory(rows: list[dict], cfgs: dict[str, RunConfig], cuda: bool):
    """Stacked bars of the analytic estimate by part, the measured peak beside each as a
    black tick (on CUDA; on a CPU the process RSS is no device memory and is not drawn).
    One unit for the axis and every label: MiB below 1 GiB."""
    plt = _pyplot()
    parts = ["weights", "gradients", "optimizer_state", "projectors", "activations"]
    names = [r["method"] for r in rows]
    est = {m: breakdown_gib(cfgs[m], weight_bytes=2 if cuda else 4) for m in names}
    measured = [r.get("peak_mem_gib") for r in rows] if cuda else []
    top = max([est[m]["total"] for m in names] + [x for x in measured if x is not None])
    unit, k = ("GiB", 1.0) if top >= 1 else ("MiB", 1024.0)

    def fmt(v: float) -> str:
        return f"{v * k:.3g} {unit}" if v else f"0 {unit}"

    fig, ax = plt.subplots(figsize=(6.8, 4.6))  # about the width the page shows it at: no scaling down
    bottom = [0.0] * len(names)
    handles = []
    for part in parts:
        vals = [est[m][part] * k for m in names]
        what = "gradients beyond activations" if part == "gradients" else part.replace("_", " ")
        bar = ax.bar(
            names, vals, bottom=bottom, label=f"{what} (≤ {fmt(max(vals) / k)})", edgecolor="white", linewidth=0.6
        )
        handles.append(bar)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):  # above the bar and above the measured tick, whichever is higher
        top = max(total, (measured[i] or 0) * k if i < len(measured) else 0)
        ax.annotate(f"{total:.3g}", (i, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    if any(x is not None for x in measured):
        ys = [x * k if x is not None else float("nan") for x in measured]
        handles.append(
            ax.scatter(names, ys, color="black", marker="_", s=500, zorder=3, label="measured peak (torch allocator)")
        )
    ax.set_ylabel(unit)
    ax.set_title(
        f"memory: the analytic estimate by part, its total above each bar ({unit})"
        + ("" if cuda else "; fp32 weights on CPU"),
        fontsize=10,
    )
    ax.tick_params(axis="x", labelsize=8)
    # the legend in the order the parts are stacked, top first, below the axes where it has room
    order = handles[: len(parts)][::-1] + handles[len(parts) :]
    ax.legend(order, [h.get_label() for h in order], fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.margins(y=0.12)
    fig.tight_layout()
    return fig


def fig_throughput(rows: list[dict], cpu: bool):
    """Median tokens/s of each method with its interquartile range; hatched where the run
    shared the machine with others."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["method"] for r in rows]
    med = [r.get("tokens_per_s") or 0 for r in rows]
    lo = [m - (r.get("tokens_per_s_iqr") or [m, m])[0] for m, r in zip(med, rows)]
    hi = [(r.get("tokens_per_s_iqr") or [m, m])[1] - m for m, r in zip(med, rows)]
    shared = [(r.get("side_by_side") or 1) > 1 for r in rows]
    ax.bar(
        names,
        med,
        yerr=[lo, hi],
        capsize=4,
        color="tab:green",
        hatch=["//" if s else "" for s in shared],
        edgecolor="white",
    )
    ax.set_ylabel("tokens/s")
    title = "training throughput: median, bars = interquartile range"
    if cpu:
        title += "\nCPU: indicative only (a shared CPU moves windows several-fold)"
    if any(shared):
        title += "\nhatched: trained side by side with other runs (shared machine)"
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


# -- the HTML page ------------------------------------------------------------------------


def _inline(text: str) -> str:
    """One line of comparison.md's markdown as HTML: **bold**, `code`."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def markdown_html(text: str) -> str:
    """The little markdown comparison.md uses (paragraphs, ## headings, tables with
    alignment, **bold**, `code`) as HTML."""
    parts = []
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        if block.startswith("# "):
            parts.append(f"<h1>{_inline(block[2:])}</h1>")
        elif block.startswith("## "):
            parts.append(f"<h2>{_inline(block[3:])}</h2>")
        elif all(line.startswith("|") for line in block.splitlines()):
            lines = block.splitlines()
            aligns = ["left" if c.strip().startswith(":") else "right" for c in lines[1].strip().strip("|").split("|")]
            rows = [line.strip().strip("|").split("|") for line in [lines[0], *lines[2:]]]

            def row(tag: str, cells: list[str]) -> str:
                return "".join(
                    f'<{tag} style="text-align:{a}{WRAP if len(c) > 60 else ""}">{_inline(c.strip())}</{tag}>'
                    for c, a in zip(cells, aligns)
                )

            body = "".join(f"<tr>{row('td', r)}</tr>" for r in rows[1:])
            parts.append(f"<table><tr>{row('th', rows[0])}</tr>{body}</table>")
            # a long cell (the losses of every method at a point) wraps rather than widen the page
        else:
            parts.append("<p>" + "<br>".join(_inline(line) for line in block.splitlines()) + "</p>")
    return "".join(parts)


WRAP = ";white-space:normal;min-width:24em"  # a cell of over 60 characters
PLOTS = ("val_loss.png", "tune.png", "memory.png", "throughput.png", "lr.png")
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1280px;padding:0 1em;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:1.4em}table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}th{background:#f3f3f3;white-space:normal;
vertical-align:bottom}
td:first-child{font-weight:600}p{max-width:1100px;line-height:1.4}code{background:#f3f3f3;padding:0 3px}
figure{display:inline-block;margin:8px;vertical-align:top}img{max-width:640px;width:100%}
.wrap{overflow-x:auto}"""


def write_report(out: Path) -> None:
    """report.html: comparison.md as a page, with the plots inlined (one file to send)."""
    body = markdown_html((out / "comparison.md").read_text())
    body = body.replace("<table>", '<div class="wrap"><table>').replace("</table>", "</table></div>")
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
        f"</figure>"
        for name in PLOTS
        if (out / name).exists()
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>petra compare</title>'
        f"<style>{CSS}</style></head><body>{body}<h2>Plots</h2>{imgs}</body></html>"
    )
    (out / "report.html").write_text(page)
