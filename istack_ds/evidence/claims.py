"""The arithmetic that decides the paper's claims from finished runs: step cost by depth, time to equal quality,
confidence intervals, convergence, verdicts. Pure functions of numbers; the runs and their files are
``tools/run_paper_experiment.py``'s.

- **Step cost by depth.** ``c(d)``, the seconds of one optimizer step of a depth-d student, measured side by side
  (``tools/run_paper_experiment.py --part cost``). A line ``c(d) = a + b d`` fitted to them gives the share of a
  full-depth step spent in the student's layers, ``b D / c(D)``: the part growth can save.
- **A run's time** is its steps at each depth costed at ``c(d)``, plus its measured growth pauses: the time of the
  run on a quiet machine, free of the noise of a shared one (the runs themselves may share the machine).
- **Time to equal quality.** Full depth trained at several budgets, each with its own LR schedule, gives the
  reference curve of quality (held-out loss, lower is better) against time. A method's speed-up is the time full
  depth needs to reach the method's final quality, read off that curve (linear in log time between budgets),
  divided by the method's time. Outside the curve's range it is a bound: ``>`` (the method is better than the
  longest budget) or ``<`` (worse than the shortest).
- **Intervals.** Over seeds: mean and the t interval (95 %). Over test items (probe scores): the percentile
  bootstrap (95 %) of a ratio of sums.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError(f"fit_line: need at least two distinct x, got {list(xs)}")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def layer_share(costs: dict[int, float]) -> float:
    """Share of a full-depth step that grows with depth (the student's layers): ``b D / c(D)`` of the line
    ``c(d) = a + b d`` fitted to the measured step costs, D the deepest measured depth."""
    depth = max(costs)
    _, slope = fit_line(list(costs), list(costs.values()))
    return slope * depth / costs[depth]


def stage_steps(depths: Sequence[int], boundaries: Sequence[int], total_steps: int) -> list[tuple[int, int]]:
    """(depth, steps) of each stage of a growth schedule."""
    starts = [0, *boundaries, total_steps]
    return [(d, b - a) for d, a, b in zip(depths, starts, starts[1:])]


def costed_time(stages: Sequence[tuple[int, int]], costs: dict[int, float], pauses: float = 0.0) -> float:
    """Seconds of a run whose stages train (depth, steps) at the measured cost of each depth, plus its pauses."""
    missing = sorted({d for d, _ in stages} - set(costs))
    if missing:
        raise KeyError(f"no measured step cost for depth(s) {missing} (measured: {sorted(costs)})")
    return sum(steps * costs[d] for d, steps in stages) + pauses


@dataclass(frozen=True)
class Bounded:
    """A value read off a curve, or a bound where the curve ends: ``relation`` is ``=``, ``>`` or ``<``."""

    value: float
    relation: str = "="

    def __str__(self) -> str:
        return f"{'' if self.relation == '=' else self.relation}{self.value:.2f}x"


def time_to_quality(reference: Sequence[tuple[float, float]], quality: float) -> Bounded:
    """Time full depth needs to reach `quality` (a held-out loss), from its (time, loss) budget points.

    Linear in log time between neighbouring budgets; the loss must fall with time along the points (a curve that
    rises is measurement noise larger than the budgets' differences, and is refused). Beyond the longest budget the
    answer is ``> its time``, below the shortest ``< its time``."""
    points = sorted(reference)
    if len(points) < 2:
        raise ValueError(f"a reference curve needs >= 2 budgets, got {len(points)}")
    for (t0, q0), (t1, q1) in zip(points, points[1:]):
        if q1 > q0:
            raise ValueError(
                f"reference loss rises from {q0:.4f} at {t0:.0f} s to {q1:.4f} at {t1:.0f} s: the budgets are closer "
                "than the noise; use budgets further apart or more seeds"
            )
    if quality < points[-1][1]:
        return Bounded(points[-1][0], ">")
    if quality > points[0][1]:
        return Bounded(points[0][0], "<")
    for (t0, q0), (t1, q1) in zip(points, points[1:]):
        if q1 <= quality <= q0:
            if q0 == q1:
                return Bounded(t0)
            f = (q0 - quality) / (q0 - q1)
            return Bounded(math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))))
    raise AssertionError("unreachable: quality within the curve's range")


def equal_quality_speedup(reference: Sequence[tuple[float, float]], time: float, quality: float) -> Bounded:
    """Full depth's time to the method's final `quality`, over the method's `time` (a bound outside the curve)."""
    needed = time_to_quality(reference, quality)
    return Bounded(needed.value / time, needed.relation)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.3f} (1 seed)"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_ci(values: Sequence[float]) -> Interval:
    """Mean and 95 % t interval over seeds (one value: the value, no interval)."""
    values = list(values)
    if not values:
        raise ValueError("mean_ci of no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, mean, mean, 1)
    from scipy.stats import t

    half = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], draws: int = 2000, seed: int = 0):
    """sum(num) / sum(den) over test items and its 95 % percentile-bootstrap interval (items resampled)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"bootstrap over {len(numerators)} numerators and {len(denominators)} denominators")
    rng, n = random.Random(seed), len(numerators)
    stats = []
    for _ in range(draws):
        pick = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(numerators[i] for i in pick) / max(1e-12, sum(denominators[i] for i in pick)))
    stats.sort()
    return Interval(sum(numerators) / sum(denominators), stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1], n)


def last_third_change(curve: Sequence[tuple[int, float]]) -> float:
    """Relative fall of a held-out loss curve [(step, loss)] over its last third: (loss at 2/3 - final) / loss at
    2/3, the loss at 2/3 of the steps interpolated linearly between the evaluations around it."""
    curve = sorted(curve)
    last_step, final = curve[-1]
    at_step = 2 * last_step / 3
    before = max((p for p in curve if p[0] <= at_step), default=curve[0])
    after = min(p for p in curve if p[0] >= at_step)
    f = 0.0 if after[0] == before[0] else (at_step - before[0]) / (after[0] - before[0])
    at = before[1] + f * (after[1] - before[1])
    return (at - final) / at


def verdict(interval: Interval, threshold: float) -> str:
    """A claim "the quantity exceeds `threshold`" judged from its 95 % interval over seeds: ``supported`` when the
    interval lies above it, ``contradicted`` when below, otherwise ``not decided at this power``."""
    if interval.n < 2:
        return "not decided (one seed)"
    if interval.low > threshold:
        return "supported"
    if interval.high < threshold:
        return "contradicted"
    return "not decided at this power"
