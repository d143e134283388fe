"""Checkpoints that survive kills, crashes in the middle of a save, non-finite losses, dead ranks and a new world size.

Every run is real: launchers/train.py (or a worker script) on 2 gloo ranks under torchrun.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from istack_ds.models.teacher import make_random_teacher
from tests.helpers import ROOT, child_env, free_port, shard_of_cut, torchrun

TOTAL = 14  # EQL over depths 2, 4, 8: depth 4 from step 5, depth 8 from step 9 (0-based step indices)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_random_teacher(tmp_path_factory.mktemp("teacher") / "hubert", size="tiny")


def run_args(out, teacher_dir, shards, *extra):
    args = ["--config", ROOT / "configs/demo.yaml", "--set", f"run.out_dir={out}", "--set", f"teacher.path={teacher_dir}",
            "--set", f"data.train_index={shards / 'train/index.json'}", "--set", "data.valid_index=null",
            "--set", f"optim.total_steps={TOTAL}", "--set", "log.every=1", "--set", "checkpoint.every=3",
            "--set", "checkpoint.keep=10", "--set", "data.num_workers=1", "--set", "data.crop_seconds=2",
            "--set", "data.batch_seconds=6", "--set", "deepspeed.dist_timeout_s=60", "--set", "log.data_audit=true"]
    for e in extra:
        args += ["--set", e]
    return [str(a) for a in args]


def scalars(tb_dir, tag):
    """Every (step, value) of `tag` over all event files of a run directory (a resumed run appends a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = defaultdict(list)
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out[e.step].append(e.value)
    return out


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, teacher_dir, demo_shards):
    out = tmp_path_factory.mktemp("unbroken")
    torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards), timeout=400)
    return out


def kill_at_step(args, step, env=None, timeout=300):
    """Starts a 2-rank run and SIGKILLs its whole process group once rank 0 has logged `step`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launchers/train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
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
    """Per rank, the resumed run read the unbroken run's shards in the same order (one unfinished shard group re-read)."""
    owner = shard_of_cut(shards / "train/index.json")
    for rank in (0, 1):
        mine, ref = shard_course(out, rank, owner), shard_course(unbroken, rank, owner)
        short, long_ = sorted((mine, ref), key=len)
        assert long_[:len(short)] == short and len(short) >= len(long_) - 1, (rank, mine, ref)


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


def test_crash_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(tmp_path, teacher_dir, demo_shards,
                                                                             unbroken):
    out = tmp_path / "run"
    args = run_args(out, teacher_dir, demo_shards)
    crashed = torchrun(ROOT / "launchers/train.py", *args, env=child_env(ISTACK_FAULTS="crash_in_save@6"),
                       check=False, timeout=400)
    assert crashed.returncode != 0
    assert (out / "checkpoints/step00000006").is_dir()  # written in part ...
    assert not (out / "checkpoints/step00000006/istack_meta.json").exists()  # ... never marked complete
    resumed = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "resumed from" in resumed.stderr and "step00000005" in resumed.stderr
    assert_same_course(out, unbroken)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards),
             env=child_env(ISTACK_FAULTS="nan@3,7"), timeout=400)
    counted = scalars(out / "tb", "train/nonfinite_steps")
    assert max(v for vals in counted.values() for v in vals) == 2.0
    assert sorted(scalars(out / "tb", "train/loss")) == list(range(1, TOTAL + 1))  # every step still happened
    assert json.loads((out / "summary.json").read_text())["steps"] == TOTAL


def test_nonfinite_losses_in_a_row_save_and_stop(tmp_path, teacher_dir, demo_shards):
    out = tmp_path / "run"
    proc = torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards, "optim.max_nonfinite=3"),
                    env=child_env(ISTACK_FAULTS="nan_all@5"), check=False, timeout=400)
    assert proc.returncode != 0
    assert "3 non-finite losses in a row at step 5" in proc.stderr
    assert (out / "checkpoints/step00000004/istack_meta.json").exists()


def test_a_dead_rank_makes_the_other_exit_in_time_naming_the_failure(tmp_path, teacher_dir, demo_shards):
    """No launcher to clean up: rank 1 is SIGKILLed at step 4 and rank 0 must leave on its own."""
    out = tmp_path / "run"
    port = free_port()
    procs = []
    for r in (0, 1):
        env = child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), ISTACK_FAULTS="die@4:1")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "launchers/train.py"),
             *run_args(out, teacher_dir, demo_shards, "deepspeed.dist_timeout_s=30")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.time()
    _, err0 = procs[0].communicate(timeout=240)
    procs[1].wait(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode != 0
    assert time.time() - start < 200
    assert "rank 0: a collective failed; another rank died or stopped answering" in err0, err0[-3000:]


def test_two_ranks_to_one_through_the_converter_keeps_the_loss(tmp_path, teacher_dir):
    torchrun("ckpt_world_size.py", "save", teacher_dir, tmp_path, nproc=2, timeout=300)
    converted = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"),
                                str(tmp_path / "checkpoints/step00000003")], cwd=ROOT, env=child_env(),
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "wrote universal checkpoint" in converted.stdout
    torchrun("ckpt_world_size.py", "resume", teacher_dir, tmp_path, nproc=1, timeout=300)
    two = json.loads((tmp_path / "save.json").read_text())
    one = json.loads((tmp_path / "resume.json").read_text())
    for step in ("4", "5"):
        assert abs(one["losses"][step] - two["losses"][step]) <= 1e-5, (step, one, two)
    assert one["lr"] == pytest.approx(two["lr"], rel=1e-9)


def test_checkpoint_of_another_shape_is_refused_naming_the_field(tmp_path, teacher_dir, demo_shards, unbroken):
    import launchers.train as train  # noqa: F401  (module import only: the check runs inside the trainer)
    from istack_ds.checkpoint import CheckpointError, check_compatible, read_meta
    from istack_ds.config import load_config

    ckpt = unbroken / "checkpoints/step00000012"
    cfg = load_config(ROOT / "configs/demo.yaml", ["student.hidden_size=96"])
    with pytest.raises(CheckpointError, match=r"student\.hidden_size=64 but this run has student\.hidden_size=96"):
        check_compatible(read_meta(ckpt), cfg.to_dict(), ckpt)
    check_compatible(read_meta(ckpt), load_config(ROOT / "configs/demo.yaml").to_dict(), ckpt)
