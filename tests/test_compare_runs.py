"""`istack compare` (istack_ds/commands/compare.py, its logic istack_ds/evidence/compare.py) on two tiny runs with
known wall times: its arithmetic."""

import json
import time

import pytest
import yaml


def _tool():
    from istack_ds.commands import compare

    return compare


def _logic():
    from istack_ds.evidence import compare

    return compare


def _write_run(path, operator, seconds_per_step, valid, depths, resumed_duplicate=False):
    """A run directory with config.yaml and TensorBoard scalars at known wall times (t0 = 1000 s)."""
    from torch.utils.tensorboard import SummaryWriter

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": path.name}, "growth": {"operator": operator}}))
    w = SummaryWriter(str(path / "tb"))
    w.add_scalar("model/depth", depths[0], 0, walltime=1000.0)
    for step in range(10, 101, 10):
        w.add_scalar("train/loss", 3.0 - step / 100, step, walltime=1000.0 + step * seconds_per_step)
        w.add_scalar(
            "model/depth", depths[0] if step <= 50 else depths[1], step, walltime=1000.0 + step * seconds_per_step
        )
    for step, value in valid:
        w.add_scalar("valid/loss", value, step, walltime=1000.0 + step * seconds_per_step + 0.5)
    if resumed_duplicate:  # a resumed run re-logs step 100 later: the latest value counts
        w.add_scalar("valid/loss", valid[-1][1], 100, walltime=1000.0 + 100 * seconds_per_step + 0.5)
    w.add_scalar("diag/cka_L8", 0.9, 100, walltime=1000.0 + 100 * seconds_per_step)
    w.close()


def test_speedups_at_equal_steps_and_equal_valid_loss(tmp_path):
    _write_run(tmp_path / "full", "none", 1.0, [(50, 2.0), (100, 1.0)], (4, 4))
    # 0.8 s a step; its valid loss crosses 1.0 between step 50 (1.5, t=40.5) and step 100 (0.5, t=80.5).
    _write_run(tmp_path / "grow", "interleaved", 0.8, [(50, 1.5), (100, 0.5)], (2, 4), resumed_duplicate=True)
    # Never reaches the baseline's final valid loss.
    _write_run(tmp_path / "slow", "gradstack", 0.5, [(50, 3.0), (100, 1.2)], (2, 4))
    out = tmp_path / "cmp"
    tool = _tool()
    assert tool.main([str(tmp_path / "full"), str(tmp_path / "grow"), str(tmp_path / "slow"), "--out", str(out)]) == 0

    rows = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())}
    full, grow, slow = rows["full"], rows["grow"], rows["slow"]
    assert full["baseline"] and not grow["baseline"]
    assert full["wall_s"] == pytest.approx(100.0) and grow["wall_s"] == pytest.approx(80.0)
    assert full["speedup_equal_steps"] == pytest.approx(1.0)
    assert grow["speedup_equal_steps"] == pytest.approx(100.0 / 80.0)
    assert slow["speedup_equal_steps"] == pytest.approx(2.0)
    # Baseline reaches 1.0 at its last evaluation (t = 100.5); grow at 40.5 + 40 * (1.5 - 1.0) / (1.5 - 0.5) = 60.5.
    assert full["time_to_target_s"] == pytest.approx(100.5)
    assert grow["time_to_target_s"] == pytest.approx(60.5)
    assert grow["steps_to_target"] == pytest.approx(75.0)
    assert grow["speedup_equal_loss"] == pytest.approx(100.5 / 60.5)
    assert slow["speedup_equal_loss"] is None
    assert grow["final_depth"] == 4 and grow["final_valid_loss"] == pytest.approx(0.5)
    assert grow["final_cka_supervised"] == pytest.approx(0.9)

    table = (out / "comparison.md").read_text()
    assert "| grow | interleaved | 100 | 4 | 80.0 |" in table
    assert "1.25x" in table and f"{100.5 / 60.5:.2f}x" in table and "not reached" in table
    assert "full (baseline)" in table
    assert (out / "comparison.png").stat().st_size > 10_000


def test_interpolation_helpers():
    tool = _logic()
    points = [(10, 5.0, 3.0), (20, 15.0, 2.0), (30, 20.0, 1.0)]
    assert tool.time_at_step(points, 15) == pytest.approx(10.0)
    assert tool.time_at_step(points, 30) == pytest.approx(20.0)
    assert tool.time_at_step(points, 40) is None
    assert tool.time_to_loss(points, 3.5) == (5.0, 10.0)  # already below at the first evaluation
    assert tool.time_to_loss(points, 1.5) == pytest.approx((17.5, 25.0))
    assert tool.time_to_loss(points, 0.5) is None


def test_a_directory_without_logs_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no tb/ directory"):
        _tool().main([str(tmp_path), "--out", str(tmp_path / "cmp")])


def _resumed_run(path, purge: bool):
    """Steps 10..100 at 1 s a step, then a resume from the checkpoint at step 50 that logs 60..80 again (value + 10).

    `purge`: written by Metrics (purge_step on resume); otherwise as runs before it were, without purge_step.
    """
    from torch.utils.tensorboard import SummaryWriter

    from istack_ds.metrics import Metrics

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": path.name}, "growth": {"operator": "none"}}))
    first = SummaryWriter(str(path / "tb"))
    for step in range(10, 101, 10):
        first.add_scalar("train/loss", step, step, walltime=1000.0 + step)
    first.close()
    if purge:
        # TensorBoard reads event files in name order, and the name starts with the second it was made in.
        start = int(time.time())
        while int(time.time()) == start:
            time.sleep(0.05)
        metrics = Metrics(path, 100, resume_step=50)
        later = metrics.writer
    else:
        later = SummaryWriter(str(path / "tb"), filename_suffix=".resumed")
    for step in range(60, 81, 10):
        later.add_scalar("train/loss", step + 10, step, walltime=2000.0 + step)
    later.close()


def test_a_resumed_run_reads_as_tensorboard_shows_it_with_or_without_purge_step(tmp_path):
    import matplotlib

    tool = _tool()
    expected = [(s, s - 10.0, float(s)) for s in range(10, 51, 10)] + [(s, 990.0 + s, s + 10.0) for s in (60, 70, 80)]
    for purge in (True, False):
        _resumed_run(tmp_path / f"purge_{purge}", purge)
        # Old runs too: the orphaned steps 90 and 100 (after the resume point, never logged again) are gone.
        assert _logic().read_run(tmp_path / f"purge_{purge}").get("train/loss") == expected

    # The plot leaves the caller's matplotlib backend as it was (a notebook keeps its own).
    before = matplotlib.get_backend()
    matplotlib.use("template")
    try:
        assert (
            tool.main([str(tmp_path / "purge_True"), str(tmp_path / "purge_False"), "--out", str(tmp_path / "c")]) == 0
        )
        assert matplotlib.get_backend() == "template"
    finally:
        matplotlib.use(before)


def _diagnosed_run(path, operator, maps_by_step):
    """A run directory whose CKA maps are logged as the trainer logs them: LayerDiagnostics.run through Metrics."""
    import torch

    from istack_ds.diagnostics import CkaMaps, LayerDiagnostics
    from istack_ds.metrics import Metrics

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": path.name}, "growth": {"operator": operator}}))
    metrics = Metrics(path, 100)
    diagnostics = LayerDiagnostics(None, batch={"audio": None})
    for step, self_map in maps_by_step.items():
        depth = len(self_map) - 1
        student = type(
            "Student", (), {"depth": depth, "loss_kind": "l2l", "supervised": [depth - 1], "teacher_layers": [8]}
        )
        maps = CkaMaps(
            torch.full((depth + 1, 9), 0.5, dtype=torch.float64), torch.tensor(self_map, dtype=torch.float64)
        )
        diagnostics.compute_maps = lambda *a, maps=maps, **k: maps
        metrics.scalars(step, {"train/loss": 1.0, "valid/loss": 1.0})
        diagnostics.run(student, None, metrics, step)
    metrics.close()


def _block_map(depth, within=0.95, across=0.3):
    """Student x student CKA of an interleaved stack: hidden states 2k-1 and 2k (a clone and its source) alike."""
    return [
        [1.0 if i == j else within if i and j and (i + 1) // 2 == (j + 1) // 2 else across for j in range(depth + 1)]
        for i in range(depth + 1)
    ]


def test_student_cka_figure_of_each_runs_last_validation(tmp_path, monkeypatch):
    import numpy as np

    from istack_ds import diagnostics

    # The TensorBoard heatmaps are not what compare reads: skip drawing them.
    monkeypatch.setattr(diagnostics, "cka_figure", lambda *a, **k: None)
    monkeypatch.setattr(diagnostics, "figure_image", lambda fig: np.zeros((2, 2, 3), np.uint8))
    grown = _block_map(4)
    _diagnosed_run(tmp_path / "grow", "interleaved", {50: _block_map(2, within=0.1), 100: grown})
    _diagnosed_run(tmp_path / "full", "none", {100: _block_map(4, within=0.5, across=0.5)})
    _write_run(tmp_path / "old", "gradstack", 1.0, [(50, 3.0), (100, 1.2)], (2, 4))  # logged no CKA map
    out = tmp_path / "cmp"
    tool = _tool()
    runs = [str(tmp_path / name) for name in ("grow", "full", "old")]
    assert tool.main([*runs, "--out", str(out)]) == 0

    # What compare reads is what the diagnostics wrote (the last validation's map), from TensorBoard alone.
    run = _logic().read_run(tmp_path / "grow")
    assert run.matrices["student_student"] == (100, grown)
    rows = {r["run"]: r for r in json.loads((out / "comparison.json").read_text())}
    assert rows["grow"]["cka_student_student"] == grown and rows["grow"]["cka_student_student_step"] == 100
    assert rows["grow"]["final_cka_student_adjacent"] == pytest.approx((0.95 + 0.3 + 0.95) / 3)  # (1,2) (2,3) (3,4)
    assert "cka_student_student" not in rows["old"]
    assert _logic().supervised_at(run, 100) == {4: 8}

    for name in ("cka_student.png", "cka_teacher.png"):
        assert (out / name).stat().st_size > 10_000
    table = (out / "comparison.md").read_text()
    assert "`cka_student.png`: student layer x student layer linear CKA at each run's last validation" in table
    assert "grow (step 100), full (step 100)" in table and "not logged, no panel: old" in table

    # Re-run with only the run that logged no maps: the CKA figures go, and comparison.md says why.
    assert tool.main([str(tmp_path / "old"), "--out", str(out)]) == 0
    assert not (out / "cka_student.png").exists() and not (out / "cka_teacher.png").exists()
    assert "no `cka_student.png`: no run logged" in (out / "comparison.md").read_text()
