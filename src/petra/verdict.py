"""Whether a compare's ranking holds: the ranking of the methods at every evaluation point
they share, the crossovers between points, and a settled-or-not verdict.

Early in training the rankings of optimizers are known to reverse (arXiv 2509.02046: judge at
the end of a stated budget). So a ranking is called *settled* only if no pair of methods was
in the opposite order at any evaluation in the last half of the budget; two methods whose
losses differ by less than their spread are a tie, which is compatible with either order.

The spread of a pair: with several seeds (the same seeds for every method: the same
initialization and data order), the standard deviation of the per-seed differences, the
convention of compare's gap column; with one seed, two standard errors of the difference
of the two validation means (the validation sample's noise: seed-to-seed spread unknown).

Pure Python over plain numbers: no torch, testable on synthetic curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# below this many training tokens per parameter a compare measures early training
EARLY_TOKENS_PER_PARAM = 1.0
EARLY_WARNING = (
    "early training: under 1 token per parameter, rankings of methods are known to reverse "
    "later (arXiv 2509.02046); judge methods at the end of a longer budget (e.g. --tokens 20x)"
)


@dataclass
class Measure:
    """One method's validation losses at one evaluation point: one per seed, with each
    loss's standard error over the validation windows."""

    losses: list[float]
    ses: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)

    @property
    def sd(self) -> float | None:
        n = len(self.losses)
        if n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.losses) / (n - 1))


def pair_spread(a: Measure, b: Measure) -> float:
    """The noise of the difference a - b (module docstring)."""
    if len(a.losses) >= 2 and len(a.losses) == len(b.losses):
        return Measure([x - y for x, y in zip(a.losses, b.losses)]).sd
    se = [*a.ses[:1], *b.ses[:1]]
    return 2 * math.sqrt(sum(s * s for s in se)) if len(se) == 2 else 0.0


def relation(a: Measure, b: Measure) -> int:
    """-1 if a is lower (better) beyond the spread, +1 if higher, 0 a tie."""
    d = a.mean - b.mean
    return 0 if abs(d) <= pair_spread(a, b) else (-1 if d < 0 else 1)


def tiers(point: dict[str, Measure]) -> list[list[str]]:
    """The methods best first, grouped: a method joins the group of the one before it when
    the two are tied."""
    order = sorted(point, key=lambda m: point[m].mean)
    out: list[list[str]] = []
    for m in order:
        if out and relation(point[out[-1][-1]], point[m]) == 0:
            out[-1].append(m)
        else:
            out.append([m])
    return out


def ranking_text(groups: list[list[str]]) -> str:
    """'full > galore = fira > relora': best first, '=' for a tie."""
    return " > ".join(" = ".join(g) for g in groups)


def _rel(groups: list[list[str]], a: str, b: str) -> int:
    rank = {m: i for i, g in enumerate(groups) for m in g}
    return (rank[a] > rank[b]) - (rank[a] < rank[b])


@dataclass
class Crossover:
    """Methods a and b changed order between two evaluation points, the new order beyond
    their spread; `leader` leads after."""

    a: str
    b: str
    before: int  # tokens at the last point of the old order
    after: int  # tokens at the first point of the new one
    leader: str


@dataclass
class Verdict:
    grid: list[int]  # the evaluation points (tokens) every method has
    rankings: list[list[list[str]]]  # the tiers at each point
    crossovers: list[Crossover]
    settled: bool
    unsettled_pairs: list[tuple[str, str, int]]  # pairs in the opposite order late, at which tokens
    means: dict[int, dict[str, float]]  # the mean loss of each method at each point

    @property
    def last_crossover(self) -> Crossover | None:
        return max(self.crossovers, key=lambda c: c.after, default=None)

    @property
    def final(self) -> list[list[str]]:
        return self.rankings[-1] if self.rankings else []


def judge(curves: dict[str, dict[int, Measure]]) -> Verdict:
    """The verdict over every point all methods were evaluated at (tokens -> Measure per
    method). Crossovers are where the mean losses of a pair change order; the verdict is
    settled if no pair's order beyond the spread, at any point in the last half of the
    budget, is the opposite of its order at the end."""
    methods = list(curves)
    common = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
    rankings = [tiers({m: curves[m][t] for m in methods}) for t in common]
    crossovers = []  # a pair's strict order (beyond the spread) reversed; ties are passed over
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            sign, at = 0, None
            for t in common:
                r = relation(curves[a][t], curves[b][t])
                if r and sign and r != sign:
                    crossovers.append(Crossover(a, b, at, t, a if r < 0 else b))
                if r:
                    sign, at = r, t
    unsettled = []
    if common:
        end = common[-1]
        final = rankings[-1]
        for t, groups in zip(common, rankings):
            if 2 * t < end:
                continue
            for i, a in enumerate(methods):
                for b in methods[i + 1 :]:
                    now, last = _rel(groups, a, b), _rel(final, a, b)
                    if now and last and now != last:
                        unsettled.append((a, b, t))
    means = {t: {m: curves[m][t].mean for m in methods} for t in common}
    return Verdict(common, rankings, crossovers, not unsettled, unsettled, means)


def fmt_tokens(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.3g}B"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def summary_lines(v: Verdict, params: int) -> list[str]:
    """The verdict in words: the final ranking, settled or not, the last crossover."""
    if not v.grid:
        return ["No evaluation point is shared by every method: no ranking."]

    def where(t: int) -> str:
        return f"{fmt_tokens(t)} tokens ({t / params:.3g} per parameter)"

    lines = [f"Final ranking at {where(v.grid[-1])}, best first: **{ranking_text(v.final)}**."]
    last = v.last_crossover
    cross = (
        f"the last crossover: {last.leader} went ahead of {last.b if last.leader == last.a else last.a} "
        f"between {where(last.before)} and {where(last.after)}"
        if last
        else "no two methods changed order at the evaluation points"
    )
    if v.settled:
        lines.append(
            f"**Settled**: no pair of methods was in the opposite order over the last half of the budget; {cross}."
        )
    else:
        pairs = sorted({(a, b) for a, b, _ in v.unsettled_pairs})
        named = ", ".join(f"{a} / {b}" for a, b in pairs[:6])
        lines.append(
            f"**Not settled; a longer budget may change it**: {named} were in the opposite order within "
            f"the last half of the budget; {cross}."
        )
    return lines
