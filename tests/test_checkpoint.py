"""Checkpoints with real engines: a resume after a kill at a seeded random step, or after one rank crashed in the
middle of a save (resuming inside an epoch and a shard group), ends with the unbroken run's weights and Adam
moments, bit for bit; a
corrupt newest checkpoint is reported and the previous one resumes; a resume from an older checkpoint starts a new
timeline; another world size converts and resumes by itself; a checkpoint of another shape is refused.

Every run is real: launchers/train.py (or a worker script) on 2 gloo ranks under torchrun. The file-level rules
(choice, verification, set-aside, pruning) are tested without engines in tests/test_checkpoint_files.py.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, TOTAL, child_env, ranks_env, run_args, run_worker, scalars, shard_of_cut, torchrun

pytestmark = pytest.mark.procgroup


#: Two shards a group: each rank's epoch (4 shards) has two groups, so a checkpoint can fall inside a group;
#: dropout on, so every resume must give back each rank's RNG exactly.
RESUMABLE = ("data.interleave_shards=2", "student.dropout=0.1")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, teacher_dir, demo_shards):
    out = tmp_path_factory.mktemp("unbroken")
    torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards, *RESUMABLE), timeout=400)
    return out


def _tensors(obj, prefix: str, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}/{i}", out)


def assert_same_weights_and_moments(run, reference, step=TOTAL):
    """Every tensor of the final checkpoints (weights, fp32 partitions, Adam moments) is bitwise equal."""
    tag = f"checkpoints/step{step:08d}"
    got, want = {}, {}
    for tensors, root in ((got, run / tag), (want, reference / tag)):
        for f in sorted(root.glob("*_states.pt")):
            _tensors(torch.load(f, map_location="cpu", weights_only=False), f.name, tensors)
    assert sorted(got) == sorted(want) and any("exp_avg_sq" in k for k in want), sorted(want)[:20]
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, differ[:10]


def resumed_position(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "resumed from" in line)


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
        env=env or ranks_env(),
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
        # the run restarted at this or an earlier step (a kill right after a step was logged: the resume redoes it)
        if kept and e["step"] <= kept[-1]["step"]:
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


def test_kill9_at_a_seeded_random_step_then_resume_ends_with_the_unbroken_runs_weights(
    tmp_path, teacher_dir, demo_shards, unbroken
):
    out = tmp_path / "run"
    args = run_args(out, teacher_dir, demo_shards, *RESUMABLE)
    # Checkpoints at steps 3, 5 (growth), 6, 9 (growth), 12; growth boundaries after steps 4 and 8.
    seed = int(os.environ.get("ISTACK_TEST_SEED", random.randrange(2**31)))
    step = random.Random(seed).randint(4, TOTAL - 1)
    print(f"kill step {step} (ISTACK_TEST_SEED={seed} reproduces it)")
    kill_at_step(args, step)
    resumed = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "resumed at the saved position" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_course(out, unbroken)
    assert_no_shard_skipped(out, unbroken, demo_shards)
    assert_same_weights_and_moments(out, unbroken)
    assert_tensorboard_shows_the_run_once(out)


def assert_tensorboard_shows_the_run_once(out):
    """What `tensorboard --logdir out/tb` shows of a resumed run: each step once (purge_step), hparams, the config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp

    from istack_ds.tbview import find_events

    acc = EventAccumulator(str(find_events(out / "tb")), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, TOTAL + 1)), steps
    start = hp.parse_session_start_info_plugin_data(acc.PluginTagToContent(hp.PLUGIN_NAME)[hp.SESSION_START_INFO_TAG])
    assert start.hparams["optim.total_steps"].number_value == TOTAL
    assert any(tag.startswith("config/yaml") for tag in acc.Tags()["tensors"]), acc.Tags()["tensors"]
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


def test_one_rank_crashing_in_the_middle_of_a_save_resumes_inside_a_shard_group_on_the_unbroken_course(
    tmp_path, teacher_dir, demo_shards, unbroken
):
    out = tmp_path / "run"
    args = run_args(out, teacher_dir, demo_shards, *RESUMABLE)
    # rank 1 dies in the save of step 9, after DeepSpeed wrote its partition, before its rank file; rank 0 is
    # left waiting in the save's barrier
    crashed = torchrun(
        ROOT / "launchers/train.py", *args, env=child_env(ISTACK_FAULTS="crash_in_save@9:1"), check=False, timeout=400
    )
    assert crashed.returncode != 0
    assert (out / "checkpoints/step00000009").is_dir()  # written in part ...
    assert not (out / "checkpoints/step00000009/istack_meta.json").exists()  # ... never marked complete
    resumed = torchrun(ROOT / "launchers/train.py", *args, timeout=400)
    assert "step00000006" in resumed_position(resumed.stderr)
    assert "a save that did not finish" in resumed.stderr
    # step 6's data position: rank 1 inside a shard group (a batch of it handed out), both inside an epoch
    positions = [
        torch.load(out / f"checkpoints/step00000006/rank{r}.pt", weights_only=True)["data"]["positions"]["0"]
        for r in (0, 1)
    ]
    assert positions[1]["batches_in_group"] > 0 and all(p["shards_done"] == 2 for p in positions), positions
    assert "resumed at the saved position" in resumed.stderr
    assert_same_course(out, unbroken)
    assert_no_shard_skipped(out, unbroken, demo_shards)
    assert_same_weights_and_moments(out, unbroken)


def copy_run(unbroken, out, drop=()):
    """A copy of the unbroken run to resume, without its summary (and without the checkpoints in `drop`)."""
    shutil.copytree(unbroken, out)
    (out / "summary.json").unlink()
    for step in drop:
        shutil.rmtree(out / f"checkpoints/step{step:08d}")


def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_resumes(
    tmp_path, teacher_dir, demo_shards, unbroken
):
    out = tmp_path / "run"
    copy_run(unbroken, out)
    # step 14: a file every rank reads, zeroed at its own size, its marker rewritten to match: as if saved so
    # (passes verification, fails to load)
    from istack_ds.checkpoint import read_meta, write_marker

    model = out / "checkpoints/step00000014/mp_rank_00_model_states.pt"
    model.write_bytes(bytes(model.stat().st_size))
    write_marker(model.parent, read_meta(model.parent))
    # step 12: rank 1's partition cut short (fails verification before anything loads)
    part = out / "checkpoints/step00000012/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:100])
    resumed = torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards, *RESUMABLE), timeout=400)
    assert "step00000014 did not load" in resumed.stderr, resumed.stderr[-3000:]
    assert (
        "passed over" in resumed.stderr and "zero_pp_rank_1_mp_rank_00_optim_states.pt has 100 bytes" in resumed.stderr
    )
    assert "step00000009" in resumed_position(resumed.stderr)
    aside = list((out / "checkpoints/set_aside").iterdir())
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step00000012", "step00000014"]
    assert_same_weights_and_moments(out, unbroken)


def test_a_resume_from_an_older_checkpoint_starts_a_new_timeline(tmp_path, teacher_dir, demo_shards, unbroken):
    """The usual recovery from divergence: back to step 6 with a lower LR; `auto` never returns to the old run.

    The new config also moves the growth boundaries to before step 6 (item 9): the student grows at once.
    """
    out = tmp_path / "run"
    copy_run(unbroken, out)
    args = run_args(out, teacher_dir, demo_shards, *RESUMABLE, "optim.lr=1e-3", "growth.boundaries=[2,5]")
    resumed = torchrun(
        ROOT / "launchers/train.py", *args, "--set", f"checkpoint.resume={out}/checkpoints/step00000006", timeout=400
    )
    assert "new timeline from" in resumed.stderr, resumed.stderr[-3000:]
    assert "schedule re-planned: the checkpoint has depth 4 at step 6" in resumed.stderr
    assert "growth: step 6: depth 4 -> 8" in resumed.stderr
    assert {s: v[-1] for s, v in scalars(out / "tb", "model/depth").items() if s >= 7} == {s: 8.0 for s in range(7, 15)}
    aside = next((out / "checkpoints/set_aside").iterdir())
    assert sorted(p.name for p in aside.iterdir()) == ["step00000009", "step00000012", "step00000014"]
    metas = {n: json.loads((out / f"checkpoints/step{n:08d}/istack_meta.json").read_text()) for n in (6, 9, 14)}
    assert metas[9]["timeline"] == metas[14]["timeline"] != metas[6]["timeline"]
    assert metas[14]["config"]["optim"]["lr"] == 1e-3
    # what `checkpoint.resume=auto` resumes after the next crash: the new timeline's newest
    from istack_ds.checkpoint import Checkpointer

    assert Checkpointer(out / "checkpoints", keep=10).latest(world=2) == out / "checkpoints/step00000014"


def test_a_run_on_another_world_size_converts_and_resumes_by_itself(tmp_path, teacher_dir, demo_shards, unbroken):
    out = tmp_path / "run"
    copy_run(unbroken, out, drop=(12, 14))
    one = torchrun(
        ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards, *RESUMABLE), nproc=1, timeout=400
    )
    log = one.stderr
    assert "saved by 2 rank(s), this run has 1: converting" in log, log[-3000:]
    assert "global batch is kept with gradient accumulation 2" in log
    assert "restarts at the start of epoch" in log
    assert "step00000009_universal" in resumed_position(log)
    lr, ref_lr = scalars(out / "tb", "train/lr"), scalars(unbroken / "tb", "train/lr")
    for step in range(10, TOTAL + 1):
        assert lr[step][-1] == pytest.approx(ref_lr[step][0], rel=1e-6), step
    assert json.loads((out / "summary.json").read_text())["depth"] == 8


# ZeRO-3: DeepSpeed's universal load gives every flat partition one `step` tensor (the second step after the resume
# drifted by 6e-4 before device.settle_optimizer_states) and every parameter group the first one's weight decay
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_to_one_through_the_converter_keeps_the_loss(tmp_path, teacher_dir, zero_stage):
    two = run_worker(
        "checkpoint_world_size.py",
        "--phase",
        "save",
        "--teacher",
        teacher_dir,
        "--run-dir",
        tmp_path,
        "--zero-stage",
        zero_stage,
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
        "--zero-stage",
        zero_stage,
        nproc=1,
        timeout=300,
    )[0]
    for step in ("4", "5"):
        assert abs(one["losses"][step] - two["losses"][step]) <= 1e-5, (step, one, two)
    assert one["lr"] == pytest.approx(two["lr"], rel=1e-9)


def test_checkpoint_of_another_shape_is_refused_naming_the_field(tmp_path, teacher_dir, demo_shards, unbroken):
    from istack_ds.checkpoint import CheckpointError, read_meta
    from istack_ds.config import load_config
    from istack_ds.resume import check_compatible

    ckpt = unbroken / "checkpoints/step00000012"
    cfg = load_config(ROOT / "configs/demo.yaml", ["student.hidden_size=96"])
    with pytest.raises(CheckpointError, match=r"student\.hidden_size=64 but this run has student\.hidden_size=96"):
        check_compatible(read_meta(ckpt), cfg.to_dict(), ckpt)
    check_compatible(read_meta(ckpt), load_config(ROOT / "configs/demo.yaml").to_dict(), ckpt)
