"""Growth schedule: optimizer step -> stage and depth.

``step`` is always the number of optimizer steps already taken (the engine's
``global_steps``), i.e. the index of the next step. Stage ``i`` (0-based here)
trains steps ``starts[i] <= step < starts[i + 1]`` at ``depths[i]``; the growth
into stage ``i >= 1`` happens before step ``starts[i]`` is taken.

Stage ``k`` (1-based) gets a share of the total steps proportional to
``k ** alpha``: alpha = 0 is EQL (25/25/25/25 % for 4 stages), alpha = 1 is
PROP-1 (10/20/30/40 %). ``growth.boundaries`` overrides alpha.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    depths: list[int]
    """Depth of each stage."""
    boundaries: list[int]
    """First step of stages 2..B (the steps at which the student grows); len = len(depths) - 1."""
    total_steps: int
    """Optimizer steps of the whole run."""

    def __post_init__(self):
        if len(self.boundaries) != len(self.depths) - 1:
            raise ValueError(f"{len(self.depths)} stages need {len(self.depths) - 1} boundaries, got {self.boundaries}")
        steps = [0, *self.boundaries, self.total_steps]
        lengths = [b - a for a, b in zip(steps, steps[1:])]
        if min(lengths) < 1:
            raise ValueError(
                f"stage boundaries {self.boundaries} give stages of {lengths} steps out of total_steps="
                f"{self.total_steps}: every stage needs at least one step (boundaries strictly increasing, > 0 "
                "and < total_steps)"
            )

    @classmethod
    def from_config(cls, growth, total_steps: int) -> Schedule:
        """From a :class:`istack_ds.config.GrowthConfig` (operator `none`: one stage at the final depth)."""
        depths = list(growth.stage_depths)
        if len(depths) == 1:
            return cls(depths, [], total_steps)
        if growth.boundaries is not None:
            return cls(depths, list(growth.boundaries), total_steps)
        return cls.proportional(depths, growth.alpha, total_steps)

    @classmethod
    def proportional(cls, depths: list[int], alpha: float, total_steps: int) -> Schedule:
        """Stage k (1-based) gets ``round``-ed share ``k**alpha / sum_j j**alpha`` of the steps."""
        if not math.isfinite(alpha):
            raise ValueError(f"alpha={alpha} must be a finite number")
        try:
            weights = [float(k + 1) ** float(alpha) for k in range(len(depths))]
        except OverflowError:
            weights = [math.inf]
        total_w = sum(weights)
        if not math.isfinite(total_w):
            raise ValueError(f"alpha={alpha}: the stage weights k**alpha overflow")
        boundaries, acc = [], 0.0
        for w in weights[:-1]:
            acc += w
            boundaries.append(int(round(total_steps * acc / total_w)))
        return cls(list(depths), boundaries, total_steps)

    @property
    def starts(self) -> list[int]:
        """First step of every stage (starts with 0)."""
        return [0, *self.boundaries]

    def stage_at(self, step: int) -> int:
        """0-based stage that trains optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        return bisect.bisect_right(self.boundaries, step)

    def depth_at(self, step: int) -> int:
        return self.depths[self.stage_at(step)]

    def growth_at(self, step: int) -> int | None:
        """The new depth when ``step`` is the first step of a new stage (grow before taking it), else None."""
        i = bisect.bisect_left(self.boundaries, step)
        if i < len(self.boundaries) and self.boundaries[i] == step:
            return self.depths[i + 1]
        return None
