"""tools/bench/gpu_check.py, which can only measure where a GPU is lent: its CPU smoke run (every stage) keeps it
from rotting in between; its FLOP formula, host-sync counter, stage isolation and speed-up projection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, load_tool, ranks_env

gpu_check = load_tool("tools/bench/gpu_check.py")
gpu_costs = load_tool("tools/bench/gpu_costs.py")


@pytest.mark.procgroup
def test_gpu_check_smoke_runs_every_stage_on_cpu(tmp_path):
    """--smoke on the CPU: versions + a step, growth on ZeRO-2 and ZeRO-3, a 2-rank save resumed on 1 rank through
    a universal checkpoint, and every front end x depth x teacher x batch timed; one JSON and the table."""
    proc = subprocess.run(
        [sys.executable, "tools/bench/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=ranks_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["1 versions", "2 growth", "3 resume", "4 steps"]
    assert all(s["ok"] for s in stages.values()), [s.get("error") for s in stages.values()]
    assert stages["1 versions"]["engine_device"] == "cpu" and stages["1 versions"]["deepspeed"]
    for zero in ("zero2", "zero3"):
        assert stages["2 growth"][zero]["depth"] == 4 and stages["2 growth"][zero]["pause_s"] > 0
    resume = stages["3 resume"]
    assert (resume["resumed_step"], resume["step_after"]) == (2, 3) and "universal" in resume["saved_path"]
    cases = stages["4 steps"]["cases"]
    assert [(c["utterances"], c["frontend"], c["depth"], c["teacher"]) for c in cases] == [
        (u, f, d, t) for u in (1, 2) for f in ("trainable", "shared") for d in (2, 4) for t in gpu_check.TEACHERS
    ]
    for c in cases:
        assert c["step_s"] > 0 and 0 < c["teacher_frac"] < 1 and c["flops"] > c["teacher_flops"] > 0, c
    assert all(c["host_reads"] > 0 for c in cases if c["teacher"] == "fp32")
    assert len(stages["4 steps"]["projections"]) == 2 * 2 * 3 and not stages["4 steps"]["skipped"]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "# istack_ds GPU check: CPU" in text and "| 4 steps | ok |" in text and "projected EQL" in text


def test_a_failing_stage_is_reported_and_the_next_one_runs():
    report = {"device": "CPU", "setup": "", "stages": []}

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    gpu_check.run_stage(report, "2 growth", broken)
    gpu_check.run_stage(report, "3 resume", lambda: {"x": 1})
    assert [(s["stage"], s["ok"]) for s in report["stages"]] == [("2 growth", False), ("3 resume", True)]
    assert "illegal memory access" in report["stages"][0]["error"] and "Traceback" in report["stages"][0]["traceback"]
    assert "| 2 growth | FAILED: RuntimeError: CUDA error" in gpu_check.table(report)


def test_an_engine_off_the_visible_gpu_fails_stage_one():
    assert "a CPU fallback" in gpu_check.fallback_error(True, "cpu")
    assert gpu_check.fallback_error(True, "cuda:0") == "" and gpu_check.fallback_error(False, "cpu") == ""


def test_stage_four_starts_no_case_after_its_deadline(tmp_path):
    """Past --budget-s every remaining case is listed as skipped, none half-measured."""
    shapes = gpu_check.Shapes.make(smoke=True, steps=1)
    result = gpu_check.stage_steps(shapes, tmp_path, deadline=0.0)
    assert result["cases"] == [] and result["projections"] == []
    assert len(result["skipped"]) == len(shapes.utterances) * 2 * len(shapes.depths)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from istack_ds.models.teacher import Teacher, make_random_teacher

    path = tmp_path_factory.mktemp("t") / "teacher"
    make_random_teacher(path, size="tiny")
    teacher = Teacher(path, [4, 8])
    teacher.model.set_attn_implementation("eager")  # attention as matmuls, which torch's counter sees
    return teacher


def test_flop_formula_matches_torch_flop_counter(tiny_teacher):
    """The analytic forward FLOPs (CNN, every per-frame weight, attention) against torch's FlopCounterMode,
    which counts the convolutions and matmuls the forward really runs."""
    from torch.utils.flop_counter import FlopCounterMode

    samples = 16000
    with FlopCounterMode(display=False) as counter:
        tiny_teacher(torch.randn(2, samples), torch.tensor([samples, samples]))
    ours = gpu_costs.forward_flops(tiny_teacher.model, samples, with_cnn=True)
    assert 2 * ours["total"] == pytest.approx(counter.get_total_flops(), rel=0.01)
    assert ours["cnn"] > 0 and ours["attention"] > 0
    shared = gpu_costs.forward_flops(tiny_teacher.model, samples, with_cnn=False, frames=49)
    assert shared["cnn"] == 0 and shared["weights"] == ours["weights"]


def test_host_syncs_counted_by_calling_package():
    x = torch.ones(3)
    before = {n: vars(torch.Tensor).get(n) for n in gpu_costs.HOST_READS}
    with gpu_costs.HostSyncs(device_only=False) as syncs:
        x.sum().item()
        bool(x.any())
        x.tolist()
    with gpu_costs.HostSyncs(device_only=True) as on_device:
        x.sum().item()  # a CPU tensor: no sync on a GPU machine
    assert syncs.by_package == {"tests": 3} and not on_device.by_package
    assert all(vars(torch.Tensor).get(n) is before[n] for n in gpu_costs.HOST_READS)  # the methods are restored


def test_projection_of_linear_step_times_is_the_depth_ratio():
    """Step time proportional to depth: EQL over 3/6/9/12 gives 12 / 7.5 = 1.6x, PROP-1 12 / 9 = 1.33x."""
    step_s = {3: 1.0, 6: 2.0, 9: 3.0, 12: 4.0}
    assert gpu_costs.projected(step_s, [3, 6, 9, 12], alpha=0) == pytest.approx(1.6)
    assert gpu_costs.projected(step_s, [3, 6, 9, 12], alpha=1) == pytest.approx(4 / 3)


def test_projection_per_teacher_against_the_fp32_teachers_full_depth():
    """bf16 halves every step here: EQL is still 1.6x over its own full depth, 3.2x over the fp32 teacher's."""
    fp32 = {3: 1.0, 6: 2.0, 9: 3.0, 12: 4.0}
    rows = [
        {"utterances": 2, "frontend": "shared", "teacher": t, "depth": d, "step_s": s * (0.5 if t == "bf16" else 1)}
        for t in ("fp32", "bf16")
        for d, s in fp32.items()
    ]
    p = {r["teacher"]: r for r in gpu_check.project(rows, [3, 6, 9, 12], (2,))}
    assert set(p) == {"fp32", "bf16"}  # fp32+TF32 was not timed: no row
    assert p["bf16"]["eql"] == pytest.approx(1.6) and p["bf16"]["full_depth_vs_fp32"] == pytest.approx(2.0)
    assert p["bf16"]["eql_vs_fp32_full_depth"] == pytest.approx(3.2) and p["fp32"]["full_depth_vs_fp32"] == 1.0


def test_peak_table_names_the_h100_variants():
    assert gpu_costs.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_costs.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_costs.peak_tflops("Some GPU") is None


def test_carried_wheels_are_the_versions_this_suite_tests_and_never_the_devices_own():
    """tools/bench/build_gpu_wheels.sh pins each carried package to the version installed here (what the suite ran
    with), and carries neither torch nor the device's transformers or numpy."""
    from importlib import metadata

    script = (ROOT / "tools/bench/build_gpu_wheels.sh").read_text()
    block = script.split("PACKAGES=(", 1)[1].split(")", 1)[0]
    pins = dict(p.split("==") for p in block.split())
    pins["deepspeed"] = script.split("DEEPSPEED=deepspeed==", 1)[1].split()[0]
    assert {"torch", "transformers", "numpy"}.isdisjoint(pins)
    assert {"deepspeed", "lhotse", "webdataset", "pydantic", "hjson"} <= set(pins)
    for name, version in pins.items():
        assert metadata.version(name) == version, name
