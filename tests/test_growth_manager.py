"""GrowthManager (istack_ds/growth/manager.py) growing live DeepSpeed ZeRO engines: 2 gloo ranks, each test in
its own processes.

The workers (tests/workers/growth_*.py) do the checking on every rank and exit non-zero on
failure; the tests read rank 0's result for the headline numbers.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_worker


def result(script: str, *args) -> dict:
    """Rank 0's result of a growth worker on 2 ranks."""
    return run_worker(script, *args)[0]


@pytest.mark.procgroup
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_growth_copies_states_first_step_matches_adamw_lr_unbroken(zero):
    """3 -> 6 (copy) -> 9 (reset): states equal their sources (clones' moments zero under reset),
    the first step after growth equals torch AdamW from the same states, the LR never restarts."""
    r = result("growth_states.py", "--zero", zero, "--model", "toy", "--depths", "3,6,9")
    assert r["ref_max_diff"] <= 1e-6
    assert r["depth"] == 9 and len(r["lrs"]) == 9


@pytest.mark.procgroup
def test_growth_hubert_student_zero3():
    """The same on a tiny HF HubertModel wrapped as `sfm` (weight-norm pos-conv), 2 -> 4 -> 6 on ZeRO 3."""
    r = result("growth_states.py", "--zero", 3, "--model", "hubert", "--depths", "2,4,6")
    assert r["ref_max_diff"] <= 1e-6


@pytest.mark.procgroup
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_growth_bf16_reads_back(zero):
    """bf16 (HF Hubert student): growth works, fp32 masters/moments read back exactly, bf16 weights hold the master."""
    r = result("growth_states.py", "--zero", zero, "--model", "hubert", "--precision", "bf16", "--depths", "2,4,6")
    assert r["ref_max_diff"] is None and r["depth"] == 6


@pytest.mark.procgroup
def test_rebuild_same_depth_continues_loss_curve_and_readback_names_bad_param():
    r = result("growth_rebuild.py", "--zero", "1,2,3")
    assert r["zero1"] == r["zero2"] == r["zero3"]
    assert "layers.1.fc1.weight" in r["readback_error"]


@pytest.mark.procgroup
@pytest.mark.parametrize("zero", [2, 3])
def test_memory_flat_over_six_rebuilds(zero):
    r = result("growth_memory.py", "--zero", zero, "--rebuilds", 6)
    rss = r["rss_mib"]
    assert len(rss) == 6 and max(rss) <= 1.10 * rss[0], rss


# ---- in process: the growth.* choices reach the lineage (issue 14, item 4) ----------------------


def test_manager_grows_with_the_configured_pick_and_refuses_another():
    from istack_ds.config import OptimConfig
    from istack_ds.growth import GrowthManager

    def build(depth, supervised):
        raise AssertionError("not built here")

    first = GrowthManager(build, {}, OptimConfig(), "layers.", "interleaved", pick="first")
    assert first.lineage(6, 9) == [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert GrowthManager(build, {}, OptimConfig(), "layers.", "interleaved").lineage(6, 9) == [
        0,
        1,
        1,
        2,
        3,
        3,
        4,
        5,
        5,
    ]
    assert GrowthManager(build, {}, OptimConfig(), "layers.", "midas").lineage(6, 9) == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"growth\.pick='middle' is not allowed"):
        GrowthManager(build, {}, OptimConfig(), "layers.", pick="middle")  # type: ignore[arg-type]
