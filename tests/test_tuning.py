"""Successive halving of compare --tune, driven by a fake loss."""

import math

from petra.tuning import Halving, lr_grid, survivors


def drive(h: Halving, loss) -> list[tuple[float, int]]:
    """Run the halving to its end with loss(lr, step); the order in which runs were handed out."""
    handed = []
    while True:
        new = h.next_runs()
        if not new:
            return handed
        handed += new
        for lr, step in new:
            h.report(lr, step, loss(lr, step))


def bowl(best: float, fails_above: float = math.inf):
    """A loss lowest at lr = best, falling with steps; runs above fails_above diverge."""

    def loss(lr, step):
        return None if lr > fails_above else 3.0 + (math.log2(lr / best)) ** 2 / 10 + 100 / step

    return loss


def test_the_worse_half_stops_at_the_rung_and_the_rest_go_to_the_end():
    h = Halving(lr_grid(1e-2, 5), steps=800, rung=200)
    handed = drive(h, bowl(1e-2))
    assert [s for _, s in handed[:5]] == [200] * 5  # every point starts the full schedule's quarter
    assert sorted(h.going_on) == [5e-3, 1e-2] and len(h.stopped) == 3  # survivors(5) == 2
    assert sorted(lr for lr, s in handed if s == 800) == [5e-3, 1e-2]  # they resume to the end
    assert h.chosen == 1e-2 and not h.edge and h.done
    # the cost: 5 quarters + 2 resumed for three quarters = 2.75 budgets
    assert sum(s if s == 200 else s - 200 for _, s in handed) / 800 == 5 * 0.25 + 2 * 0.75


def test_the_grid_grows_past_a_best_edge_at_most_twice():
    h = Halving(lr_grid(1e-2, 3), steps=400, rung=100)  # 5e-3, 1e-2, 2e-2; best far above
    drive(h, bowl(1.0))
    assert h.grid == [5e-3, 1e-2, 2e-2, 4e-2, 8e-2] and h.extensions == 2
    assert h.chosen == 8e-2 and h.edge  # still at the edge: flagged


def test_a_diverging_rate_is_dropped_and_every_rate_failing_is_reported():
    h = Halving(lr_grid(1e-2, 3), steps=400, rung=100)
    drive(h, bowl(2e-2, fails_above=1.5e-2))  # the best is 2e-2 but it diverges: 1e-2 wins
    assert h.final[2e-2] == math.inf and h.chosen == 1e-2
    h = Halving(lr_grid(1e-2, 3), steps=400, rung=100)
    drive(h, lambda lr, step: None)
    assert h.failed and h.done and h.chosen is None


def test_replaying_the_same_results_reaches_the_same_choice():
    # a compare run again hands out the same runs in the same order (its runs answer from disk)
    a, b = Halving(lr_grid(1e-3, 4), 800, 200), Halving(lr_grid(1e-3, 4), 800, 200)
    assert drive(a, bowl(3e-3)) == drive(b, bowl(3e-3)) and a.chosen == b.chosen


def test_survivors_are_the_better_half_but_at_least_two():
    assert [survivors(n) for n in (2, 3, 4, 5, 7)] == [2, 2, 2, 2, 3]
