"""compare's report as a person sees it: the page rendered in headless Chromium (tables fit,
no markdown shows, text columns left-aligned, the heading says what ran), and the plots'
layout read from matplotlib (titles and legends inside the picture, legends off the data,
in stacking order, one unit)."""

import json
import re
import shutil
import subprocess

import pytest

from petra.cli import main
from petra.config import from_dict


@pytest.fixture(scope="module")
def cmp(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("report") / "cmp"
    argv = ["compare", "--preset", "tiny", "--methods", "full,galore,galore8bit,relora", "--steps", "8"]
    argv += ["--batch-size", "4", "--seq-len", "32", "--seeds", "2", "--out", str(out), "--no-progress"]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "train.val_tokens=256"]
    assert main(argv) == 0
    return out


def _rows(out):
    return json.loads((out / "comparison.json").read_text())


MEASURE = """<script>
window.addEventListener('load', () => {
  const tables = [...document.querySelectorAll('table')];
  const r = {
    width: window.innerWidth,
    tables: tables.map(t => ({w: t.getBoundingClientRect().width, box: t.parentElement.clientWidth})),
    align: Object.fromEntries(tables.flatMap(t => [...t.rows[0].cells].map((h, i) =>
      [h.innerText.replace(/\s+/g, ' '), getComputedStyle(t.rows[1].cells[i]).textAlign]))),
    text: document.body.innerText,
    h1: document.querySelector('h1').innerText,
    imgs: [...document.images].map(i => i.naturalWidth > 0),
  };
  const pre = document.createElement('pre'); pre.id = 'measure'; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def _render(page: str, tmp_path) -> dict:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chrome is None:
        pytest.skip("needs headless Chromium (.ci/run installs Debian's chromium)")
    html = tmp_path / "measured.html"
    html.write_text(page.replace("</body>", MEASURE + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]
    dom = subprocess.run([chrome, *flags, html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="measure">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    import html as h

    return json.loads(h.unescape(found.group(1)))


def test_the_report_page_is_readable_in_a_browser(cmp, tmp_path):
    m = _render((cmp / "report.html").read_text(), tmp_path)
    assert all(t["w"] <= t["box"] + 1 for t in m["tables"]), m["tables"]  # every table fits its column
    assert all(t["w"] <= m["width"] for t in m["tables"])
    a = m["align"]  # words left-aligned, numbers right
    assert {a[k] for k in ("method", "status", "ranking", "losses", "optimizer", "warm start")} == {"left"}, a
    assert {a[k] for k in ("val ppl", "tokens", "trainable params", "peak GiB")} == {"right"}, a
    for leak in ("**", "`", "|---", "| "):
        assert leak not in m["text"], leak
    assert "8 steps of batch 4 x 32 tokens" in m["h1"] and "'bible'" in m["h1"] and "cpu" in m["h1"]
    assert all(m["imgs"]) and len(m["imgs"]) == 4  # val loss, memory, throughput, lr: all decode
    assert "seed article GiB" not in m["text"]  # a column empty in every row is not shown
    assert "Verdict" in m["text"] and "tokens per parameter" in m["text"]


def test_the_loss_column_keeps_its_spread_over_seeds_and_the_curves_their_band(cmp):
    from petra.compare import curves_of
    from petra.report import fig_val_loss
    from petra.verdict import judge

    rows = _rows(cmp)
    assert all(r["val_loss_sd"] is not None for r in rows)
    assert "(sd, 2 seeds)" in (cmp / "comparison.md").read_text()
    curves = {
        r["method"]: curves_of([cmp / r["method"] / f"seed-{k}" for k in (0, 1)]) for r in rows
    }  # both seeds of every method
    fig = fig_val_loss(curves, judge(curves), 362_816)
    ax = fig.axes[0]
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 4  # one ±sd band per method
    assert "last half (verdict)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:4] == [r["method"] for r in rows]


def _inside(fig, artist) -> bool:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box, whole = artist.get_window_extent(r), fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)
    return box.x0 >= whole.x0 - 1 and box.x1 <= whole.x1 + 1 and box.y0 >= whole.y0 - 1 and box.y1 <= whole.y1 + 1


def test_the_memory_plot_has_its_legend_off_the_bars_in_stacking_order_and_one_unit(cmp):
    from petra.report import fig_memory

    rows = _rows(cmp)
    cfgs = {r["method"]: from_dict(json.loads((cmp / r["run_dir"] / "config.json").read_text())) for r in rows}
    fig = fig_memory(rows, cfgs, cuda=False)
    ax, legend = fig.axes[0], fig.axes[0].get_legend()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    assert not legend.get_window_extent(r).overlaps(ax.get_window_extent(r))  # beside the bars, never over
    assert _inside(fig, ax.title) and _inside(fig, legend)
    labels = [t.get_text() for t in legend.get_texts()]
    assert [x.split(" (")[0] for x in labels] == [
        "activations",
        "projectors",
        "optimizer state",
        "gradients beyond activations",
        "weights",
    ]  # the top of the stack first
    units = {u for text in labels + [t.get_text() for t in ax.texts] for u in re.findall(r"[GM]iB", text)}
    assert units == {"MiB"} and ax.get_ylabel() == "MiB"  # a tiny model: MiB throughout
    assert "estimate" in ax.get_title() and "total above each bar" in ax.get_title()  # not a measurement
    assert not any(re.search(r"\d+(\.\d+)?e-\d", t) for t in labels)


def test_the_throughput_plot_shows_its_spread_and_says_cpu_is_indicative(cmp):
    from petra.report import fig_throughput

    fig = fig_throughput(_rows(cmp), cpu=True)
    ax = fig.axes[0]
    assert "indicative" in ax.get_title() and _inside(fig, ax.title)
    assert any(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)  # the interquartile range
