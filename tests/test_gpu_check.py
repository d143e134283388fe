"""tools/bench/gpu_check.py, which can only run where a GPU is lent: its CPU smoke run keeps it from rotting
in between, and its speed-up projection."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, load_tool, ranks_env

gpu_check = load_tool("tools/bench/gpu_check.py")


@pytest.mark.procgroup
def test_gpu_check_smoke_run_on_cpu(tmp_path):
    """--tiny on the CPU: every front end x depth timed through the real Trainer, the report written."""
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [sys.executable, "tools/bench/gpu_check.py", "--tiny", "--fp32", "--steps", "1", "--out", str(out)],
        cwd=ROOT,
        env=ranks_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["frontend"], r["depth"]) for r in rows] == [(f, d) for f in ("trainable", "shared") for d in (2, 4, 8)]
    for r in rows:
        assert r["step_s"] > 0 and 0 < r["teacher_frac"] < 1 and r["audio_s_per_s"] > 0, r
    text = out.read_text()
    assert "# istack_ds GPU check: CPU" in text and "| shared |" in text and "projected EQL speed-up" in text


def test_projection_of_linear_step_times_is_the_depth_ratio():
    """Step time proportional to depth: EQL over 3/6/9/12 gives 12 / 7.5 = 1.6x, PROP-1 12 / 9 = 1.33x."""
    step_s = {3: 1.0, 6: 2.0, 9: 3.0, 12: 4.0}
    assert gpu_check.projected(step_s, [3, 6, 9, 12], alpha=0) == pytest.approx(1.6)
    assert gpu_check.projected(step_s, [3, 6, 9, 12], alpha=1) == pytest.approx(4 / 3)
