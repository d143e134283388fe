"""Checkpoints: complete-or-not saves, resume after a kill or a crash in the middle of a save on the unbroken
run's course, a new world size through the converter, a checkpoint of another shape refused.

Every run is real: launchers/train.py (or a worker script) on 2 gloo ranks under torchrun.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from istack_ds.models.teacher import make_random_teacher
from tests.helpers import ROOT, TOTAL, child_env, run_args, run_worker, scalars, shard_of_cut, torchrun


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher") / "hubert", size="tiny")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, teacher_dir, demo_shards):
    out = tmp_path_factory.mktemp("unbroken")
    torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards), timeout=400)
    return out


def kill_at_step(args, step, env=None, timeout=300):
    """Starts a 2-rank run and SIGKILLs its whole process group once rank 0 has logged `step`."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "launchers/train.py"),
        *args,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"step {step}/{TOTAL} " in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen[-50:])
    proc.wait(timeout=60)
    assert proc.returncode != 0, "".join(seen[-50:])


def shard_course(out, rank, owner):
    """The shards a rank read, in order, consecutive repeats merged; a resume's redone steps replace the first try's."""
    entries = [json.loads(line) for line in (out / f"data_audit/rank{rank}.jsonl").read_text().splitlines()]
    kept = []
    for e in entries:
        if kept and e["step"] < kept[-1]["step"]:  # the run restarted at an earlier step: those steps were redone
            while kept and kept[-1]["step"] >= e["step"]:
                kept.pop()
        kept.append(e)
    course = []
    for e in kept:
        for cut in e["cut_ids"]:
            if not course or course[-1] != owner[cut]:
                course.append(owner[cut])
    return course


def assert_no_shard_skipped(out, unbroken, shards):
    """Per rank, the resumed run read the unbroken run's shards in the same order
    (one unfinished shard group re-read)."""
    owner = shard_of_cut(shards / "train/index.json")
    for rank in (0, 1):
        mine, ref = shard_course(out, rank, owner), shard_course(unbroken, rank, owner)
        short, long_ = sorted((mine, ref), key=len)
        assert long_[: len(short)] == short and len(short) >= len(long_) - 1, (rank, mine, ref)


def assert_same_course(out, unbroken):
    """Continuous global steps 1..TOTAL, the unbroken run's LR at every step, the right depth at the end."""
    lr, ref_lr = scalars(out / "tb", "train/lr"), scalars(unbroken / "tb", "train/lr")
    assert sorted(lr) == list(range(1, TOTAL + 1)), sorted(lr)
    for step, values in lr.items():  # steps between the checkpoint and the kill were logged twice
        for v in values:
            assert v == pytest.approx(ref_lr[step][0], rel=1e-6, abs=1e-12), (step, v, ref_lr[step])
    depth, ref_depth = scalars(out / "tb", "model/depth"), scalars(unbroken / "tb", "model/depth")
    assert {s: v[-1] for s, v in depth.items() if s in ref_depth} == {s: v[-1] for s, v in ref_depth.items()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == TOTAL and summary["depth"] == 8


@pytest.mark.parametrize("where", ["random_after_first_checkpoint", "between_checkpoint_and_growth"])
def test_kill9_then_resume_follows_the_unbroken_run(tmp_path, teacher_dir, demo_shards, unbroken, where):
    out = tmp_path / "run"
    args = run_args(out, teacher_dir, demo_shards)
    # Checkpoints at steps 3, 5 (growth), 6, 9 (growth), 12; growth boundaries after steps 4 and 8.
    step = random.Random().randint(4, TOTAL - 1) if where == "random_after_first_checkpoint" else 7
    print(f"killing at step {step}")
    kill_at_step(args, step)
    resumed = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "resumed at the saved position" in resumed.stderr
    assert_same_course(out, unbroken)
    assert_no_shard_skipped(out, unbroken, demo_shards)


def test_crash_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(
    tmp_path, teacher_dir, demo_shards, unbroken
):
    out = tmp_path / "run"
    args = run_args(out, teacher_dir, demo_shards)
    crashed = torchrun(
        ROOT / "launchers/train.py", *args, env=child_env(ISTACK_FAULTS="crash_in_save@6"), check=False, timeout=400
    )
    assert crashed.returncode != 0
    assert (out / "checkpoints/step00000006").is_dir()  # written in part ...
    assert not (out / "checkpoints/step00000006/istack_meta.json").exists()  # ... never marked complete
    resumed = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "resumed from" in resumed.stderr and "step00000005" in resumed.stderr
    assert_same_course(out, unbroken)


def test_two_ranks_to_one_through_the_converter_keeps_the_loss(tmp_path, teacher_dir):
    two = run_worker(
        "checkpoint_world_size.py",
        "--phase",
        "save",
        "--teacher",
        teacher_dir,
        "--run-dir",
        tmp_path,
        nproc=2,
        timeout=300,
    )[0]
    converted = subprocess.run(
        [sys.executable, str(ROOT / "tools/convert_checkpoint.py"), str(tmp_path / "checkpoints/step00000003")],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "wrote universal checkpoint" in converted.stdout
    one = run_worker(
        "checkpoint_world_size.py",
        "--phase",
        "resume",
        "--teacher",
        teacher_dir,
        "--run-dir",
        tmp_path,
        nproc=1,
        timeout=300,
    )[0]
    for step in ("4", "5"):
        assert abs(one["losses"][step] - two["losses"][step]) <= 1e-5, (step, one, two)
    assert one["lr"] == pytest.approx(two["lr"], rel=1e-9)


def test_checkpoint_of_another_shape_is_refused_naming_the_field(tmp_path, teacher_dir, demo_shards, unbroken):
    from istack_ds.checkpoint import CheckpointError, check_compatible, read_meta
    from istack_ds.config import load_config

    ckpt = unbroken / "checkpoints/step00000012"
    cfg = load_config(ROOT / "configs/demo.yaml", ["student.hidden_size=96"])
    with pytest.raises(CheckpointError, match=r"student\.hidden_size=64 but this run has student\.hidden_size=96"):
        check_compatible(read_meta(ckpt), cfg.to_dict(), ckpt)
    check_compatible(read_meta(ckpt), load_config(ROOT / "configs/demo.yaml").to_dict(), ckpt)
