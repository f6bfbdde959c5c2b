"""`compare --tune`: each method's peak learning rate chosen at the end of the full budget,
by successive halving.

Every point of a factor-2 grid around the method's paper rate starts the full-length run
(the compare's own schedule: a rate that is best over a short schedule need not be best over
the long one). At `rung` (a quarter of the steps) the runs are ranked by validation loss;
while the best is at an edge of the grid, the grid grows one point past it (at most
`extend` times); then the worse half stops there and the rest resume (exact resume makes the
stop free) to the end, where the lowest final validation loss is chosen. The chosen run is
the method's final run for the first seed. A 5-point grid costs 5 x 1/4 + 2 x 3/4 = 2.75
budgets (the 25%-horizon sweeps it replaced cost 1.25, plus 1 for the final run).

Pure logic: the compare's scheduler starts the runs `next_runs` names and reports back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def lr_grid(centre: float, points: int) -> list[float]:
    """`points` learning rates a factor 2 apart, centred (geometrically) on `centre`."""
    return [_round(centre * 2.0 ** (k - (points - 1) / 2)) for k in range(points)]


def _round(lr: float) -> float:
    return float(f"{lr:.4g}")


def survivors(n: int) -> int:
    """How many runs go on past the rung: the better half, at least 2 (so the choice is
    made at the end between two runs at least)."""
    return min(n, max(2, n // 2))


@dataclass
class Halving:
    grid: list[float]
    steps: int
    rung: int  # the step at which the worse half stops (an evaluation point)
    extend: int = 2
    at_rung: dict[float, float] = field(default_factory=dict)  # lr -> val loss at the rung (inf: failed)
    final: dict[float, float] = field(default_factory=dict)  # lr -> final val loss (inf: failed)
    stopped: list[float] = field(default_factory=list)  # stopped at the rung
    going_on: list[float] | None = None  # the runs past the rung, once decided
    extensions: int = 0
    started: set = field(default_factory=set)  # (lr, stop) already handed out

    def next_runs(self) -> list[tuple[float, int]]:
        """(lr, the step to train to) of runs that may start now and were not handed out."""
        if len(self.at_rung) < len(self.grid):
            want = [(lr, self.rung) for lr in self.grid if lr not in self.at_rung]
        elif self.going_on is None:
            return []
        else:
            want = [(lr, self.steps) for lr in self.going_on if lr not in self.final]
        new = [w for w in want if w not in self.started]
        self.started.update(new)
        return new

    def report(self, lr: float, step: int, loss: float | None) -> None:
        """A run reached `step` (the rung or the end) with this validation loss (None: failed)."""
        loss = loss if loss is not None and math.isfinite(loss) else math.inf
        if step >= self.steps:
            self.final[lr] = loss
            self.at_rung.setdefault(lr, loss)
        else:
            self.at_rung[lr] = loss
        if step < self.steps and loss == math.inf:
            self.final[lr] = loss  # a failed run does not go on
        if len(self.at_rung) == len(self.grid):
            self._after_rung()

    def _after_rung(self) -> None:
        best = min(self.grid, key=lambda lr: self.at_rung[lr])
        if self.going_on is not None or self.at_rung[best] == math.inf:
            return
        if best in (self.grid[0], self.grid[-1]) and self.extensions < self.extend and len(self.grid) > 1:
            self.extensions += 1
            beyond = _round(best * (2 if best == self.grid[-1] else 0.5))
            self.grid = sorted([*self.grid, beyond])
            return
        ranked = sorted(self.grid, key=lambda lr: self.at_rung[lr])
        keep = [lr for lr in ranked[: survivors(len(ranked))] if self.at_rung[lr] < math.inf]
        self.stopped = sorted(lr for lr in self.grid if lr not in keep)
        self.going_on = sorted(keep)

    @property
    def failed(self) -> bool:
        """Every run failed before the rung."""
        return len(self.at_rung) == len(self.grid) and all(v == math.inf for v in self.at_rung.values())

    @property
    def done(self) -> bool:
        return self.failed or (self.going_on is not None and all(lr in self.final for lr in self.going_on))

    @property
    def chosen(self) -> float | None:
        if not self.done or self.failed:
            return None
        best = min(self.going_on, key=lambda lr: self.final[lr])
        return best if self.final[best] < math.inf else None

    @property
    def edge(self) -> bool:
        """The choice is at the grid's edge: the best rate may lie beyond it."""
        return self.chosen in (self.grid[0], self.grid[-1])
