"""The paper experiment's whole path in its tiny mode (tools/run_paper_experiment.py --tiny): corpus, trained teacher,
step cost by depth, full depth at two budgets and interleaved EQL on real gloo ranks, probes with their floors,
the table, the verdicts and the figure. What a user continuing the experiment part by part relies on: a rerun
reuses every finished run."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import run_paper_experiment as experiment  # noqa: E402


@pytest.mark.procgroup
def test_tiny_experiment_end_to_end_and_reused(tmp_path, capsys):
    args = ["--tiny", "--only", "full_depth", "interleaved_eql", "--data", str(tmp_path / "data")]
    args += ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    assert experiment.main(args) == 0

    docs = tmp_path / "docs"
    results = json.loads((docs / "results.json").read_text())
    costs = results["step_cost"]["seconds_per_step"]
    assert set(costs) == {"shared@3", "shared@6", "shared@9", "shared@12", "trainable@12"}
    assert all(v > 0 for v in costs.values())
    assert set(results["runs"]) == {"full_depth@0.5/seed1", "full_depth@1/seed1", "interleaved_eql@1/seed1"}
    arms = results["analysis"]["arms"]
    # EQL spends a quarter of its steps at each depth: ideally faster than full depth, at equal steps
    assert arms["interleaved_eql"]["ideal_equal_steps"] > 1.0 == arms["full_depth"]["ideal_equal_steps"]
    for arm in arms.values():
        assert {"loss", "loss_L4", "loss_L8", "loss_L12", "equal_quality_loss", "probes"} <= set(arm)
        assert 0 <= arm["probes"]["per"]["low"] <= arm["probes"]["per"]["mean"] <= arm["probes"]["per"]["high"]
    assert set(results["analysis"]["floors"]) == {"teacher", "teacher_hidden_state_0", "untrained_student"}
    table = (docs / "results.md").read_text()
    assert "| interleaved_eql | l2l | 1 |" in table and "interleaved_eql reaches full depth" in table
    assert (docs / "quality_vs_time.png").stat().st_size > 1000

    capsys.readouterr()
    assert experiment.main([*args, "--part", "runs"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 3
