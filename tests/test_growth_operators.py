"""Growth lineages and the stage schedule: pure functions, no torch."""

from __future__ import annotations

import pytest

from istack_ds.config import GrowthConfig
from istack_ds.growth import Schedule, carry_supervised, compose, lineage, lineage_through

R = lambda a, b: list(range(a, b))  # noqa: E731

LINEAGES = [
    # operator, d, d_new, expected src
    ("interleaved", 3, 6, [0, 0, 1, 1, 2, 2]),
    ("interleaved", 6, 9, [0, 1, 1, 2, 3, 3, 4, 5, 5]),
    ("interleaved", 9, 12, [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8]),
    ("interleaved", 6, 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
    ("interleaved", 1, 2, [0, 0]),
    ("interleaved", 2, 4, [0, 0, 1, 1]),
    ("gradstack", 3, 6, [0, 1, 2, 0, 1, 2]),
    ("gradstack", 6, 9, R(0, 6) + [3, 4, 5]),
    ("gradstack", 9, 12, R(0, 9) + [6, 7, 8]),
    ("gradstack", 6, 12, R(0, 6) * 2),
    ("gradstack", 1, 2, [0, 0]),
    ("gradstack", 2, 4, [0, 1, 0, 1]),
    # MIDAS: k = d/n blocks of n layers; block ceil(k/2) (from the input) copied whole, right after itself.
    ("midas", 3, 6, [0, 1, 2, 0, 1, 2]),
    ("midas", 6, 9, [0, 1, 2, 0, 1, 2, 3, 4, 5]),  # k = 2: block 1 (layers 0-2), never a straddling 1-3
    ("midas", 9, 12, [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]),  # k = 3: block 2
    ("midas", 12, 15, R(0, 6) + R(3, 6) + R(6, 12)),  # k = 4: block 2
    ("midas", 4, 6, [0, 1, 0, 1, 2, 3]),
    ("midas", 6, 8, [0, 1, 2, 3, 2, 3, 4, 5]),
    ("midas", 6, 12, R(0, 6) * 2),
    ("midas", 1, 2, [0, 0]),
    ("midas", 2, 4, [0, 1, 0, 1]),
    ("stack", 3, 6, [0, 1, 2, 0, 1, 2]),
    ("stack", 6, 12, R(0, 6) * 2),
    ("stack", 1, 2, [0, 0]),
    ("stack", 2, 4, [0, 1, 0, 1]),
]


# interleaved with pick: first clones the first layer of each group of d/n layers, idx_j = floor(j*d/n)
PICK_FIRST = [
    (3, 6, [0, 0, 1, 1, 2, 2]),
    (6, 9, [0, 0, 1, 2, 2, 3, 4, 4, 5]),
    (9, 12, [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]),
    (6, 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
    (4, 6, [0, 0, 1, 2, 2, 3]),
    (2, 3, [0, 0, 1]),
]


def _is_a_growth(src, d, d_new):
    assert len(src) == d_new and sorted(set(src)) == R(0, d)  # every old layer kept, each cloned at most once
    assert all(src.count(i) <= 2 for i in range(d))


@pytest.mark.parametrize("operator,d,d_new,expected", LINEAGES)
def test_lineage(operator, d, d_new, expected):
    src = lineage(operator, d, d_new)
    assert src == expected
    _is_a_growth(src, d, d_new)


@pytest.mark.parametrize("d,d_new,expected", PICK_FIRST)
def test_interleaved_pick_first(d, d_new, expected):
    src = lineage("interleaved", d, d_new, pick="first")
    assert src == expected
    _is_a_growth(src, d, d_new)
    assert lineage("interleaved", d, d_new) == lineage("interleaved", d, d_new, pick="last")  # the default


def test_paper_schedule_lineage_table():
    """3 -> 6 -> 9 -> 12 as the operators' docstring table states it, growth by growth and back to the first
    three layers."""
    table = {
        ("interleaved", "last"): (
            [0, 0, 1, 1, 2, 2],
            [0, 1, 1, 2, 3, 3, 4, 5, 5],
            [0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8],
        ),
        ("interleaved", "first"): (
            [0, 0, 1, 1, 2, 2],
            [0, 0, 1, 2, 2, 3, 4, 4, 5],
            [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8],
        ),
        ("gradstack", "last"): (R(0, 3) * 2, R(0, 6) + R(3, 6), R(0, 9) + R(6, 9)),
        ("midas", "last"): (R(0, 3) * 2, R(0, 3) * 2 + R(3, 6), R(0, 6) + R(3, 6) + R(6, 9)),
    }
    depths = [3, 6, 9, 12]
    for (operator, pick), growths in table.items():
        assert [lineage(operator, a, b, pick) for a, b in zip(depths, depths[1:])] == list(growths), (operator, pick)
    for pick in ("last", "first"):  # either pick ends with each first-stage layer as a block of 4
        assert lineage_through("interleaved", depths, pick) == [0] * 4 + [1] * 4 + [2] * 4
    # MIDAS copies whole blocks: back to the first three layers, the 12 layers are 4 copies of the block 0 1 2
    assert lineage_through("midas", depths) == [0, 1, 2] * 4
    assert lineage_through("gradstack", depths) == [0, 1, 2] * 4


def test_pick_first_moves_the_targets_with_carry():
    """With pick: first the paper's student still ends supervised at hidden states 4, 8, 12 under carry: last."""
    sup = [0, 1, 2]
    for d, d_new in ((3, 6), (6, 9), (9, 12)):
        sup = carry_supervised(sup, lineage("interleaved", d, d_new, pick="first"), "last")
    assert [i + 1 for i in sup] == [4, 8, 12]
    with pytest.raises(ValueError, match="pick='middle' is not allowed"):
        lineage("interleaved", 3, 6, pick="middle")  # type: ignore[arg-type]


def test_design_examples_back_to_the_first_layers():
    A, B, C = 0, 1, 2
    # docs/architecture.md: interleaved 3 -> 6 is A A' B B' C C', then 6 -> 9 is A A' A'' B B' B'' C C' C''
    assert lineage_through("interleaved", [3, 6]) == [A, A, B, B, C, C]
    assert lineage_through("interleaved", [3, 6, 9]) == [A, A, A, B, B, B, C, C, C]
    assert lineage_through("interleaved", [3, 6, 9, 12]) == [A] * 4 + [B] * 4 + [C] * 4
    # with d' = 2d interleaved is every layer doubled in place
    assert lineage_through("interleaved", [3, 6, 12]) == [A] * 4 + [B] * 4 + [C] * 4
    assert lineage_through("interleaved", [1, 2, 4]) == [0, 0, 0, 0]
    assert lineage_through("gradstack", [3, 6]) == [A, B, C, A, B, C]
    assert lineage_through("gradstack", [3, 6, 9]) == [A, B, C, A, B, C, A, B, C]  # + copies of layers 4..6
    assert lineage_through("midas", [3, 6]) == [A, B, C, A, B, C]
    assert lineage_through("stack", [3, 6, 12]) == [A, B, C] * 4
    assert compose([0, 0, 1, 1], [0, 1, 1, 2, 3, 3]) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "operator,d,d_new,message",
    [
        ("interleaved", 3, 3, "does not add layers"),
        ("interleaved", 6, 4, "does not add layers"),
        ("interleaved", 3, 7, "more than doubles"),
        ("gradstack", 1, 3, "more than doubles"),
        ("stack", 6, 9, "must double the depth"),
        ("none", 3, 6, "never grows"),
        ("bogus", 3, 6, "unknown growth operator"),
        ("midas", 0, 1, "at least one layer"),
        ("midas", 3, 5, "must divide the depth 3"),
        ("midas", 9, 13, "must divide the depth 9"),
    ],
)
def test_bad_growth_rejected(operator, d, d_new, message):
    with pytest.raises(ValueError, match=message):
        lineage(operator, d, d_new)


def test_carry_supervised_follows_the_lineage():
    depths = [3, 6, 9, 12]
    for carry, expected in (("last", [[1, 3, 5], [2, 5, 8], [3, 7, 11]]), ("first", [[0, 2, 4], [0, 3, 6], [0, 4, 8]])):
        sup = [0, 1, 2]
        for (d, d_new), want in zip(zip(depths, depths[1:]), expected):
            sup = carry_supervised(sup, lineage("interleaved", d, d_new), carry)
            assert sup == want, (carry, d, d_new)
    # the paper: 12-layer student ends with hidden states 4, 8, 12 supervised (last copy carries)
    assert [i + 1 for i in sup] == [1, 5, 9]
    assert carry_supervised([2], lineage("gradstack", 3, 6), "last") == [5]
    assert carry_supervised([2], lineage("gradstack", 3, 6), "first") == [2]
    with pytest.raises(ValueError, match="carry="):
        carry_supervised([0], [0, 0], "middle")


def test_paper_student_ends_supervised_at_4_8_12():
    sup = [0, 1, 2]
    for d, d_new in ((3, 6), (6, 9), (9, 12)):
        sup = carry_supervised(sup, lineage("interleaved", d, d_new), "last")
    assert [i + 1 for i in sup] == [4, 8, 12]


def test_growth_config_takes_pick_and_refuses_a_midas_growth_that_is_not_a_block():
    from istack_ds.config import ConfigError

    assert GrowthConfig().pick == "last" and GrowthConfig(pick="first").pick == "first"
    with pytest.raises(ConfigError, match=r"growth\.depths=\[3, 5\]: midas: growth 3 -> 5 adds a block of 2"):
        GrowthConfig(operator="midas", depths=[3, 5])
    GrowthConfig(operator="interleaved", depths=[3, 5])  # interleaved needs no blocks


def test_schedule_eql_and_prop1():
    eql = Schedule.from_config(GrowthConfig(depths=[3, 6, 9, 12], alpha=0), 100)
    assert eql.starts == [0, 25, 50, 75] and eql.boundaries == [25, 50, 75]
    prop = Schedule.from_config(GrowthConfig(depths=[3, 6, 9, 12], alpha=1), 100)
    assert prop.starts == [0, 10, 30, 60]
    assert [prop.depth_at(s) for s in (0, 9, 10, 29, 30, 59, 60, 99)] == [3, 3, 6, 6, 9, 9, 12, 12]
    assert [prop.stage_at(s) for s in (0, 10, 30, 60)] == [0, 1, 2, 3]
    grows = {s: prop.growth_at(s) for s in range(100) if prop.growth_at(s) is not None}
    assert grows == {10: 6, 30: 9, 60: 12}


def test_schedule_explicit_boundaries_and_none():
    s = Schedule.from_config(GrowthConfig(depths=[3, 6, 12], boundaries=[5, 40]), 100)
    assert s.starts == [0, 5, 40]
    assert (s.depth_at(4), s.depth_at(5), s.depth_at(39), s.depth_at(40)) == (3, 6, 6, 12)
    assert s.growth_at(5) == 6 and s.growth_at(40) == 12 and s.growth_at(0) is None and s.growth_at(6) is None
    full = Schedule.from_config(GrowthConfig(operator="none", depths=[3, 6, 9, 12]), 100)
    assert full.depths == [12] and full.boundaries == [] and full.depth_at(0) == 12 and full.growth_at(0) is None


def test_schedule_rejects_stages_without_steps():
    with pytest.raises(ValueError, match="every stage needs at least one step"):
        Schedule.from_config(GrowthConfig(depths=[3, 6], boundaries=[100]), 100)
    with pytest.raises(ValueError, match="every stage needs at least one step"):
        Schedule.proportional([1, 2, 3, 4, 5, 6], 0, 4)
