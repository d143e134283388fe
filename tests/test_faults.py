"""Faults injected through ISTACK_FAULTS (istack_ds/faults.py): non-finite losses are skipped and counted, or
saved and stopped on when they come in a row; a dead rank makes the other exit in time, naming the failure.

Every run is real: launchers/train.py on 2 gloo ranks.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from istack_ds.models.teacher import make_random_teacher
from tests.helpers import ROOT, TOTAL, child_env, free_port, run_args, scalars, torchrun


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher") / "hubert", size="tiny")


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards),
        env=child_env(ISTACK_FAULTS="nan@3,7"),
        timeout=400,
    )
    counted = scalars(out / "tb", "train/nonfinite_steps")
    assert max(v for vals in counted.values() for v in vals) == 2.0
    assert sorted(scalars(out / "tb", "train/loss")) == list(range(1, TOTAL + 1))  # every step still happened
    assert json.loads((out / "summary.json").read_text())["steps"] == TOTAL


def test_nonfinite_losses_in_a_row_save_and_stop(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    proc = torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards, "optim.max_nonfinite=3"),
        env=child_env(ISTACK_FAULTS="nan_all@5"),
        check=False,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "3 non-finite losses in a row at step 5" in proc.stderr
    assert (out / "checkpoints/step00000004/istack_meta.json").exists()


def test_a_dead_rank_makes_the_other_exit_in_time_naming_the_failure(tmp_path, teacher_dir, demo_shards):
    """No launcher to clean up: rank 1 is SIGKILLed at step 4 and rank 0 must leave on its own."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for r in (0, 1):
        env = child_env(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            ISTACK_FAULTS="die@4:1",
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "launchers/train.py"),
                    *run_args(out, teacher_dir, demo_shards, "deepspeed.dist_timeout_s=30"),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.time()
    _, err0 = procs[0].communicate(timeout=240)
    procs[1].wait(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0
    assert time.time() - start < 200
    assert "rank 0: a collective failed; another rank died or stopped answering" in err0, err0[-3000:]
