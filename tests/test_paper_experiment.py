"""The paper experiment's whole path in its tiny mode (tools/run_paper_experiment.py --tiny): corpus, trained teacher,
step cost by depth, full depth at two budgets and interleaved EQL on real gloo ranks, probes with their floors,
the table, the verdicts and the figure. What a user continuing the experiment part by part relies on: a rerun
reuses every finished run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import run_paper_experiment as experiment  # noqa: E402


@pytest.mark.procgroup
@pytest.mark.timeout(1200)  # the whole path and a run in parts: minutes on a quiet 2-core machine
def test_tiny_experiment_end_to_end_and_reused(tmp_path, capsys):
    args = ["--tiny", "--only", "full_depth", "interleaved_eql", "--data", str(tmp_path / "data")]
    args += ["--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    assert experiment.main(args) == 0

    docs = tmp_path / "docs" / "T8"
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
    assert "\n| 8 | " in (tmp_path / "docs" / "trend.md").read_text()  # a row per T reported

    capsys.readouterr()
    assert experiment.main([*args, "--part", "runs"]) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 3

    # run directories are not kept in git: the report rebuilds the same table from the results.json it wrote
    (tmp_path / "runs").rename(tmp_path / "runs_gone")
    assert experiment.main([*args, "--part", "report"]) == 0
    assert (docs / "results.md").read_text() == table

    # a long T in parts: --part-minutes stops the run under way at a step, with a checkpoint; the same command
    # continues it from there, and it ends with the unbroken run's weights. (Another peak LR is another regime:
    # its runs go to their own folder.)
    base = ["--tiny", "--steps", "40", "--lr", "4e-3", "--only", "interleaved_eql", "--data", str(tmp_path / "data")]
    base += ["--part", "runs"]
    in_parts = [*base, "--out", str(tmp_path / "parts"), "--docs", str(tmp_path / "docs")]
    capsys.readouterr()
    assert experiment.main([*in_parts, "--part-minutes", "0"]) == experiment.RAN_OUT
    assert "a run was stopped (--part-minutes 0.0): the same command continues it" in capsys.readouterr().out
    run = tmp_path / "parts/lr0.004/T40/seed1/interleaved_eql"
    (saved,) = (run / "checkpoints").glob("step*")
    assert 0 < int(saved.name[4:]) < 40 and not (run / "experiment.json").exists()
    assert experiment.main(in_parts) == 0
    assert f"continued from {saved.name} of 40 steps" in capsys.readouterr().out
    assert experiment.main([*base, "--out", str(tmp_path / "unbroken"), "--docs", str(tmp_path / "docs")]) == 0
    ended = {p.name: load_file(p) for p in (run / "student").glob("*.safetensors")}
    unbroken = {
        p.name: load_file(p)
        for p in (tmp_path / "unbroken/lr0.004/T40/seed1/interleaved_eql/student").glob("*.safetensors")
    }
    assert ended and ended.keys() == unbroken.keys()
    for name, tensors in ended.items():
        assert all(torch.equal(t, unbroken[name][k]) for k, t in tensors.items()), name
    assert len(json.loads((run / "parts.json").read_text())) == 2  # its wall time: both parts


def _run(arm, steps, seed, loss, regime="r1"):
    return {"arm": arm, "seed": seed, "regime": regime, "steps": steps, "time_s": steps * 0.1, "valid": {"loss": loss}}


def test_the_reference_curve_takes_full_depths_runs_of_every_t_in_the_same_regime(tmp_path):
    saved = {
        "T100": [_run("full_depth", 100, 1, 0.5), _run("full_depth", 50, 1, 0.7), _run("interleaved_eql", 100, 1, 0.6)],
        # T = 200: its full run is a point at 2T of T = 100; another regime's run and another arm are not
        "T200": [_run("full_depth", 200, 1, 0.4), _run("full_depth", 150, 1, 0.45, "r2"), _run("midas_eql", 200, 1, 1)],
    }
    for name, runs in saved.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"runs": {str(i): r for i, r in enumerate(runs)}}))
    args = experiment.argparse.Namespace(
        docs=tmp_path,
        out=tmp_path / "no_runs",
        steps=100,
        only=["full_depth", "interleaved_eql"],
        seeds=[1],
        budgets=[0.5, 1.0],
    )
    results = experiment.collect(args, costs={})
    assert {k: r["valid"]["loss"] for k, r in results.items()} == {
        ("full_depth", 0.5, 1): 0.7,
        ("full_depth", 1.0, 1): 0.5,
        ("interleaved_eql", 1.0, 1): 0.6,
        ("full_depth", 2.0, 1): 0.4,
    }


def test_a_seed_whose_reference_curve_rises_is_named_in_the_verdict():
    import paper_report

    from istack_ds.config import load_config

    def result(arm, steps, seed, loss):
        return {**_run(arm, steps, seed, loss), "loss_kind": "l2l", "wall_s": 1.0, "curve": [(steps, loss)]}

    results = {
        ("full_depth", 0.5, 1): result("full_depth", 50, 1, 0.7),
        ("full_depth", 1.0, 1): result("full_depth", 100, 1, 0.5),
        ("full_depth", 0.5, 2): result("full_depth", 50, 2, 0.5),  # seed 2's curve rises: it decides nothing
        ("full_depth", 1.0, 2): result("full_depth", 100, 2, 0.6),
        ("interleaved_eql", 1.0, 1): result("interleaved_eql", 100, 1, 0.6),
        ("interleaved_eql", 1.0, 2): result("interleaved_eql", 100, 2, 0.6),
    }
    for r in results.values():
        r["valid"] = {q: r["valid"]["loss"] for q in paper_report.TARGETS}
    costs = {"seconds_per_step": {f"shared@{d}": 0.05 + 0.01 * d for d in (3, 6, 9, 12)}}
    arm_cfgs = {
        arm: load_config(ROOT / "configs" / experiment.ARMS[arm][0]) for arm in ("full_depth", "interleaved_eql")
    }
    analysis = paper_report.analyse(results, costs, {}, {}, arm_cfgs)
    claim = analysis["claims"]["interleaved_eql"]
    assert claim["speedup"].n == 1 and claim["seeds_left_out"][0].startswith("seed 2: reference loss rises")
    assert "left out: seed 2" in paper_report.table(analysis, costs)


def test_a_stop_is_read_from_the_log_of_one_rank_and_of_several():
    # the line istack_ds.preemption writes on every rank once a stop's checkpoint is saved
    one = "12:00:01 [r0] stopped by SIGTERM on rank 0 at step 3: checkpoint /r/checkpoints/step00000003 saved; ..."
    two = "12:00:01 [r1] stopped by SIGTERM on rank 0, SIGTERM on rank 1 at step 12: checkpoint /r/c saved; ..."
    assert [int(experiment.STOPPED.search(line).group(1)) for line in (one, two)] == [3, 12]
    assert experiment.STOPPED.search("12:00:01 [r0] step 3/40 (7.5%) | loss=1.0") is None


def test_a_stopped_run_goes_on_only_from_a_complete_checkpoint_made_from_its_stamp(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000003").mkdir(parents=True)  # a save that did not finish: no marker
    (run / "started.json").write_text(json.dumps({"sets": {"optim.total_steps": 40}}))
    assert experiment.resumable(run, {"sets": {"optim.total_steps": 40}}, nproc=1) is None


def test_force_and_part_minutes_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        experiment.main(["--part", "runs", "--force", "--part-minutes", "55"])
    assert e.value.code == 2 and "would never end" in capsys.readouterr().err
