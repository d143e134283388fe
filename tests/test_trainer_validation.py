"""Trainer.validate() and the layer diagnostics (istack_ds/diagnostics.py) on 2 real gloo ranks, checked against
one-process computations, and what they log to TensorBoard."""

import pytest

from tests.helpers import run_worker


@pytest.mark.procgroup
def test_validation_equals_single_process_computation_and_cka_is_logged(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    result = run_worker(
        "trainer_validate.py", "--teacher", teacher_dir, "--shards", demo_shards, "--run-dir", out, timeout=300
    )[0]
    got, want = result["validate"], result["reference"]
    assert want["batches_per_rank"] >= 1
    assert set(got) == {"valid/loss", "valid/loss_L4", "valid/loss_L8"}
    for key, value in got.items():
        assert value == pytest.approx(want[key], rel=1e-5, abs=1e-7), (key, value, want[key])

    # The CKA map through the ZeRO engine equals the one of a plain student with the same weights.
    cka, plain = result["cka"], result["cka_plain"]
    assert len(cka) == result["depth"] + 1 and len(cka[0]) == 9  # teacher: 8 layers + input
    assert max(abs(a - b) for ra, rb in zip(cka, plain) for a, b in zip(ra, rb)) < 1e-5
    assert all(0.0 <= v <= 1.0 for row in cka for v in row)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from istack_ds.tbview import find_events

    acc = EventAccumulator(str(find_events(out / "tb")), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    s8 = result["supervised"][-1] + 1  # the 1-indexed student layer carrying target 8
    expected = {
        "valid/loss",
        "valid/loss_L4",
        "valid/loss_L8",
        "diag/cka_L4",
        "diag/cka_L8",
    }
    assert expected <= set(tags["scalars"]), expected - set(tags["scalars"])
    assert "diag/cka" in tags["images"]
    logged = acc.Scalars("diag/cka_L8")[-1]  # the CKA of the pair (student layer s8, teacher layer 8)
    assert logged.step == 2 and logged.value == pytest.approx(cka[s8][8], abs=1e-6)
    assert acc.Scalars("valid/loss")[-1].value == pytest.approx(got["valid/loss"], rel=1e-6)
