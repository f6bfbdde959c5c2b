"""The settled-or-not verdict and crossovers, on synthetic curves."""

import pytest

from petra.verdict import Measure, judge, ranking_text, summary_lines, tiers

GRID = [100 * k for k in range(1, 9)]  # 8 evaluation points


def curve(values, sd=0.0, seeds=2, sign=1):
    """A method's Measures: the given means, seeds spread symmetrically by sd (sign -1: the
    other way round, so that the per-seed differences of two methods spread too)."""
    return {t: Measure([v + sign * sd * (1 if k % 2 else -1) for k in range(seeds)]) for t, v in zip(GRID, values)}


def test_a_late_flip_is_not_settled_and_names_the_crossover():
    # low-rank leads early; full rank overtakes between the 6th and 7th points (in the last half)
    full = curve([5.0, 4.6, 4.3, 4.1, 3.95, 3.85, 3.70, 3.60])
    low = curve([4.5, 4.2, 4.0, 3.9, 3.85, 3.80, 3.75, 3.72])
    v = judge({"full": full, "galore": low})
    assert v.final == [["full"], ["galore"]] and not v.settled
    last = v.last_crossover
    assert (last.before, last.after, last.leader) == (600, 700, "full")
    assert {(a, b) for a, b, _ in v.unsettled_pairs} == {("full", "galore")}
    text = " ".join(summary_lines(v, params=1000))
    assert "Not settled; a longer budget may change it" in text and "full went ahead of galore" in text
    assert "between 600 tokens (0.6 per parameter) and 700 tokens (0.7 per parameter)" in text


def test_an_early_flip_is_settled_and_still_named():
    full = curve([5.0, 4.5, 4.0, 3.7, 3.5, 3.4, 3.3, 3.2])
    low = curve([4.5, 4.2, 4.1, 3.9, 3.8, 3.75, 3.7, 3.68])  # full ahead from the 3rd point on
    v = judge({"full": full, "galore": low})
    assert v.settled and v.final == [["full"], ["galore"]]
    assert (v.last_crossover.before, v.last_crossover.after) == (200, 300)
    assert "**Settled**" in " ".join(summary_lines(v, params=1000))


def test_ties_within_the_seed_spread_are_ties_and_compatible_with_either_order():
    # b crosses a late, but within the spread of the seeds: a tie, not a reversal
    a = curve([5.0, 4.5, 4.2, 4.0, 3.90, 3.85, 3.80, 3.78], sd=0.05)
    b = curve([5.1, 4.6, 4.3, 4.05, 3.92, 3.84, 3.79, 3.77], sd=0.05, sign=-1)
    c = curve([5.5, 5.0, 4.8, 4.6, 4.5, 4.45, 4.4, 4.38], sd=0.05)
    v = judge({"a": a, "b": b, "c": c})
    assert v.final == [["b", "a"], ["c"]] and ranking_text(v.final) == "b = a > c"
    assert v.settled  # a/b's late crossing is inside the spread
    assert not v.crossovers  # the means did cross, inside the spread: noise, not a crossover


def test_one_seed_uses_two_standard_errors_of_the_validation_means():
    point = {"a": Measure([3.00], [0.01]), "b": Measure([3.02], [0.01]), "c": Measure([3.10], [0.01])}
    assert tiers(point) == [["a", "b"], ["c"]]  # 0.02 <= 2 * sqrt(2) * 0.01; 0.08 is not


def test_only_points_every_method_has_are_judged():
    full = curve([5.0, 4.5, 4.0, 3.7, 3.5, 3.4, 3.3, 3.2])
    short = {t: m for t, m in curve([4.9, 4.4, 4.1, 3.8, 3.6, 3.5, 3.4, 3.3]).items() if t <= 400}
    v = judge({"full": full, "other": short})
    assert v.grid == [100, 200, 300, 400]
    assert judge({}).grid == [] and summary_lines(judge({}), 1) == [
        "No evaluation point is shared by every method: no ranking."
    ]


@pytest.mark.parametrize("per_param, warned", [(0.08, True), (20.0, False)])
def test_the_report_warns_of_early_training_below_one_token_per_parameter(tmp_path, per_param, warned):
    from petra.config import build_config
    from petra.report import write_report, write_tables

    params = 1000
    tokens = int(per_param * params)
    row = {"method": "full", "status": "finished", "steps": 8, "tokens": tokens, "val_loss": 3.0, "lr": 1e-3}
    v = judge({"full": curve([5, 4.5, 4, 3.8, 3.6, 3.4, 3.2, 3.0])})
    write_tables([row], tmp_path, build_config(overrides={"preset": "tiny"}), "cpu", v, params)
    write_report(tmp_path)
    md, page = (tmp_path / "comparison.md").read_text(), (tmp_path / "report.html").read_text()
    assert (f"{per_param:.3g} tokens per parameter" in md) and ("Warning, early training" in md) == warned
    assert ("Warning, early training" in page) == warned and "<h2>Verdict</h2>" in page
    assert ("Past early training" in md) != warned
