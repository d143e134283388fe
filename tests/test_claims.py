"""The arithmetic behind the paper experiment's verdicts (istack_ds/evidence/claims.py): what a reader of
docs/paper_cpu/ relies on when a speed-up, an interval or a verdict is printed."""

import math
import statistics

import pytest

from istack_ds.evidence.claims import (
    Bounded,
    bootstrap_ratio,
    costed_time,
    equal_quality_speedup,
    last_third_change,
    layer_share,
    mean_ci,
    stage_steps,
    time_to_quality,
    verdict,
)


def test_layer_share_is_the_depth_slope_times_depth_over_the_full_step():
    # c(d) = 1 + 0.1 d: at depth 12 the layers cost 1.2 of 2.2 s
    costs = {d: 1 + 0.1 * d for d in (3, 6, 9, 12)}
    assert layer_share(costs) == pytest.approx(1.2 / 2.2)


def test_a_schedule_costed_by_depth():
    stages = stage_steps([3, 6, 9, 12], [25, 50, 75], 100)
    assert stages == [(3, 25), (6, 25), (9, 25), (12, 25)]
    costs = {3: 1.0, 6: 2.0, 9: 3.0, 12: 4.0}
    assert costed_time(stages, costs, pauses=5.0) == 25 * 10 + 5
    with pytest.raises(KeyError, match=r"\[12\]"):
        costed_time(stages, {3: 1.0, 6: 1.0, 9: 1.0})


def test_time_to_quality_interpolates_in_log_time_and_bounds_outside():
    curve = [(100.0, 1.0), (400.0, 0.8), (200.0, 0.9)]  # any order
    assert time_to_quality(curve, 0.9).value == pytest.approx(200.0)
    # halfway in loss between 200 s and 400 s: the geometric mean of the times
    assert time_to_quality(curve, 0.85).value == pytest.approx(math.sqrt(200 * 400))
    assert time_to_quality(curve, 0.7) == Bounded(400.0, ">")
    assert time_to_quality(curve, 1.1) == Bounded(100.0, "<")
    # a method as good as full depth's 400 s budget in 320 s is 1.25x faster; better than every budget: a bound
    assert equal_quality_speedup(curve, 320.0, 0.8).value == pytest.approx(1.25)
    assert str(equal_quality_speedup(curve, 200.0, 0.5)) == ">2.00x"


def test_a_reference_curve_that_rises_is_refused():
    with pytest.raises(ValueError, match="rises"):
        time_to_quality([(100.0, 1.0), (200.0, 1.1)], 1.05)


def test_mean_ci_is_the_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])
    half = 4.3027 * 1.0 / math.sqrt(3)
    assert (ci.mean, ci.low, ci.high, ci.n) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3), rel=1e-4)
    assert str(mean_ci([1.5])) == "1.500 (1 seed)"
    # beyond a short table of quantiles: 12 values have t(0.975, 11) = 2.201, not the normal's 1.96
    twelve = mean_ci([1.0, 3.0] * 6)
    assert twelve.high - twelve.mean == pytest.approx(
        2.201 * statistics.stdev([1.0, 3.0] * 6) / math.sqrt(12), rel=1e-3
    )


def test_bootstrap_ratio_brackets_the_ratio_and_narrows_with_items():
    few = bootstrap_ratio([1, 3, 0, 2], [10, 10, 10, 10])
    many = bootstrap_ratio([1, 3, 0, 2] * 25, [10, 10, 10, 10] * 25)
    assert few.mean == many.mean == pytest.approx(0.15)
    assert few.low < 0.15 < few.high and many.low < 0.15 < many.high
    assert many.high - many.low < (few.high - few.low) / 3


def test_last_third_change_reads_the_loss_at_two_thirds():
    curve = [(100, 2.0), (200, 1.2), (300, 1.1)]
    assert last_third_change(curve) == pytest.approx((1.2 - 1.1) / 1.2)
    # 2/3 of 400 steps falls between two evaluations: the loss there is interpolated (1.3 at step 266.7)
    curve = [(200, 1.4), (300, 1.25), (400, 1.0)]
    assert last_third_change(curve) == pytest.approx((1.3 - 1.0) / 1.3)


def test_verdicts_follow_the_interval():
    assert verdict(mean_ci([1.2, 1.25, 1.22]), 1.0) == "supported"
    assert verdict(mean_ci([0.8, 0.85, 0.82]), 1.0) == "contradicted"
    assert verdict(mean_ci([0.9, 1.3, 1.1]), 1.0) == "not decided at this power"
    assert verdict(mean_ci([1.3]), 1.0) == "not decided (one seed)"
