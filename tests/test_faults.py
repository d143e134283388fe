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

from tests.helpers import ROOT, TOTAL, child_env, free_port, ranks_env, run_args, scalars, torchrun

pytestmark = pytest.mark.procgroup


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank_and_counted(tmp_path, teacher_dir, demo_shards):
    """NaN on rank 1 at step 3, on rank 0 at step 7: the case that hangs ZeRO if only one rank skips."""
    out = tmp_path / "run"
    torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards),
        env=child_env(ISTACK_FAULTS="nan@3:1;nan@7:0"),
        timeout=400,
    )
    counted = scalars(out / "tb", "train/nonfinite_steps")  # rank 0's count: it skipped rank 1's NaN too
    assert max(v for vals in counted.values() for v in vals) == 2.0
    assert sorted(scalars(out / "tb", "train/loss")) == list(range(1, TOTAL + 1))  # every step still happened
    assert json.loads((out / "summary.json").read_text())["steps"] == TOTAL


def test_nonfinite_losses_in_a_row_save_and_stop(tmp_path, teacher_dir, demo_shards):
    """Issue 23, 3: the divergence's save became the newest checkpoint, the one the message said to resume from,
    and with checkpoint.keep it pushed the last good one out."""
    from istack_ds.checkpoint import Checkpointer, read_meta

    out = tmp_path / "run"
    proc = torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards, "optim.max_nonfinite=3", "checkpoint.keep=1"),
        env=child_env(ISTACK_FAULTS="nan_all@5"),
        check=False,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "3 non-finite losses in a row at step 5" in proc.stderr
    diverged, good = out / "checkpoints/step00000004", out / "checkpoints/step00000003"
    assert read_meta(diverged)["diverged"] is True  # kept for inspection
    assert f"resume from the last good checkpoint {good} (step 3" in proc.stderr
    candidates, notes = Checkpointer(out / "checkpoints", keep=1).candidates(2)
    assert candidates[0] == good and any(str(diverged) in n and "diverged" in n for n in notes)


def _start_two_ranks(out, teacher_dir, demo_shards, faults: str, *extra: str) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of launchers/train.py as plain processes: no launcher cleans up after a fault."""
    return _spawn_two_ranks(
        [str(ROOT / "launchers/train.py"), *run_args(out, teacher_dir, demo_shards, *extra)], faults
    )


def _spawn_two_ranks(argv: list[str], faults: str = "") -> list[subprocess.Popen]:
    """Ranks 0 and 1 of the Python script `argv` as plain processes on a free port, stdout and stderr piped."""
    port = free_port()
    procs = []
    for r in (0, 1):
        env = ranks_env(
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            ISTACK_FAULTS=faults,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def _outlived(procs: list[subprocess.Popen], survivor: int, timeout: float) -> str:
    """The stderr of rank `survivor` once it and the other rank (killed by a fault) have ended."""
    try:
        _, err = procs[survivor].communicate(timeout=timeout)
        procs[1 - survivor].wait(timeout=60)
    finally:
        _kill_all(procs)
    return err


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL ends a SIGSTOPped process too
        p.communicate()


def _wait_until_stopped(proc: subprocess.Popen, timeout: float) -> float:
    """Waits for `proc` to be SIGSTOPped (state T in /proc); returns the time it was seen stopped."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the rank to hang exited instead (rc={proc.returncode})"
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return time.time()
        time.sleep(0.2)
    raise AssertionError(f"the rank to hang did not stop within {timeout} s")


def test_a_dead_rank_makes_the_other_exit_in_time_naming_it(tmp_path, teacher_dir, demo_shards):
    """Rank 1 is SIGKILLed at step 4 and rank 0 must leave on its own, naming rank 1."""
    procs = _start_two_ranks(tmp_path / "run", teacher_dir, demo_shards, "die@4:1", "deepspeed.dist_timeout_s=15")
    start = time.time()
    err0 = _outlived(procs, survivor=0, timeout=240)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 4, err0[-3000:]
    assert time.time() - start < 200
    assert "rank 0: a collective failed; dead or hung: rank 1 (" in err0, err0[-3000:]


# A hung rank (SIGSTOP) keeps its sockets open: its peer sees no error, only the timeout ends its wait.
# Before every group got deepspeed.dist_timeout_s, ZeRO's and growth's collectives waited torch's default
# (30 min under gloo); the survivor must now leave within the timeout, plus the heartbeat check and the exit.
HANG_TIMEOUT_S = 15
HANG_MARGIN_S = 60


@pytest.mark.parametrize(
    "fault, hung",
    [
        # Rank 1 freezes inside backward: rank 0 waits in ZeRO's gradient reduce; rank 1's heartbeat stops.
        ("hang_in_backward@2:1", 1),
        # Rank 0 freezes inside the growth before step 6, after the full-state gathers: rank 1 waits in
        # the new engine's first broadcast (on DeepSpeed's data-parallel group).
        ("hang_in_growth@6:0", 0),
    ],
    ids=["in_backward", "in_growth"],
)
def test_a_hung_rank_makes_the_other_exit_within_the_timeout_naming_it(tmp_path, teacher_dir, demo_shards, fault, hung):
    procs = _start_two_ranks(
        tmp_path / "run",
        teacher_dir,
        demo_shards,
        fault,
        f"deepspeed.dist_timeout_s={HANG_TIMEOUT_S}",
        "checkpoint.every=0",
    )
    survivor = procs[1 - hung]
    try:
        stopped_at = _wait_until_stopped(procs[hung], timeout=300)
        _, err = survivor.communicate(timeout=HANG_TIMEOUT_S + HANG_MARGIN_S)
        waited = time.time() - stopped_at
    finally:
        _kill_all(procs)
    assert survivor.returncode == 4, err[-3000:]
    assert HANG_TIMEOUT_S <= waited < HANG_TIMEOUT_S + HANG_MARGIN_S, waited
    assert f"rank {1 - hung}: a collective failed; " in err, err[-3000:]
    # Rank 1's heartbeat stops; rank 0 hosts the store, which stops answering with it.
    named = "dead or hung: rank 1 (last heartbeat" if hung == 1 else "): rank 0 or its host died or hangs"
    assert named in err, err[-3000:]


def test_a_data_failure_on_one_rank_stops_every_rank_naming_it(tmp_path, teacher_dir, demo_shards):
    """Item 7: a DataError raised on one rank only left the others waiting in the next collective."""
    out = tmp_path / "run"
    proc = torchrun(
        ROOT / "launchers/train.py",
        *run_args(out, teacher_dir, demo_shards),
        env=child_env(ISTACK_FAULTS="data_error@3:1"),
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "istack_ds: rank 0: the data stream failed: rank 1: injected by ISTACK_FAULTS" in proc.stderr, proc.stderr[
        -3000:
    ]


def test_the_survivor_of_a_sigkilled_rank_0_exits_4_never_by_sigabrt(tmp_path):
    """Issue 23, 10: once in three trials the survivor printed its message, then died by SIGABRT (rc 134) in the
    interpreter's finalization (the broken process group's teardown). It now ends with os._exit after the message:
    its finalization never runs (tests/workers/survivor_exit.py records it when it does)."""
    for trial in range(2):
        out = tmp_path / f"trial{trial}"
        procs = _spawn_two_ranks([str(ROOT / "tests/workers/survivor_exit.py"), str(out)])
        err = _outlived(procs, survivor=1, timeout=120)
        assert procs[0].returncode == -signal.SIGKILL
        assert procs[1].returncode == 4, err[-3000:]
        assert "rank 1: a collective failed; the job's store at" in err, err[-3000:]
        assert not (out / "finalized.r1").exists()


def test_a_full_disk_during_a_save_stops_every_rank_in_one_line_naming_the_file(tmp_path, teacher_dir, demo_shards):
    """Issue 23, 11: a full disk during a save was torch's inline_container traceback, with no path and no
    "no space left". Rank 1's rank file of step 6 is written to /dev/full (ENOSPC from the kernel)."""
    out = tmp_path / "run"
    procs = _start_two_ranks(out, teacher_dir, demo_shards, "disk_full@6:1")
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        _kill_all(procs)
    rank_file = out / "checkpoints/step00000006/rank1.pt"
    for r, (proc, err) in enumerate(zip(procs, errs)):
        assert proc.returncode == 2, err[-3000:]
        line = f"istack_ds: rank {r}: rank 1: writing checkpoint file {rank_file} failed: no space left on device ("
        assert line in err, err[-3000:]
        assert "Traceback" not in err and "inline_container" not in err
    assert not (out / "checkpoints/step00000006/istack_meta.json").exists()  # incomplete: never resumed


def test_a_full_disk_inside_deepspeeds_save_stops_every_rank_with_exit_2_naming_the_file(
    tmp_path, teacher_dir, demo_shards
):
    """Rank 1's optimizer-state file of step 6, written by DeepSpeed inside save_checkpoint, fails with ENOSPC. Rank
    1 raised out of DeepSpeed's save, skipping the barrier that ends it, into our gather of errors while rank 0 waited
    in that barrier: a hang until deepspeed.dist_timeout_s, then exit 4. Every rank now exits 2 in one line."""
    from istack_ds.checkpoint import Checkpointer

    out = tmp_path / "run"
    procs = _start_two_ranks(
        out, teacher_dir, demo_shards, "disk_full_deepspeed@6:1", f"deepspeed.dist_timeout_s={HANG_TIMEOUT_S}"
    )
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        _kill_all(procs)
    step6 = out / "checkpoints/step00000006"
    optim_file = step6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    for r, (proc, err) in enumerate(zip(procs, errs)):
        assert proc.returncode == 2, err[-3000:]
        line = f"istack_ds: rank {r}: rank 1: writing checkpoint file {optim_file} failed: no space left on device ("
        assert line in err, err[-3000:]
        assert "Traceback" not in err
    assert not (step6 / "istack_meta.json").exists()  # incomplete: never resumed
    candidates, _ = Checkpointer(out / "checkpoints", keep=10).candidates(2)
    assert candidates and step6 not in candidates  # auto resumes an earlier one


def test_a_hung_shard_read_is_named_by_the_survivor_and_ended_by_read_timeout_s(tmp_path, teacher_dir, demo_shards):
    """Issue 23, 7: rank 1's DataLoader read hangs (its worker's 2nd batch never comes). Without a read timeout the
    survivor's collective times out: it said every heartbeat was live and pointed at the network; it now names rank
    1 waiting for its data loader. With data.read_timeout_s, rank 1 ends the wait itself: every rank exits 5 naming
    rank 1, its worker and the shards it reads."""
    hung = _start_two_ranks(
        tmp_path / "hung",
        teacher_dir,
        demo_shards,
        "stall_in_data@2:1",
        "data.read_timeout_s=0",
        f"deepspeed.dist_timeout_s={HANG_TIMEOUT_S}",
    )
    timed = None
    try:
        _, err = hung[0].communicate(timeout=300)
        _kill_all(hung)  # rank 1 would wait for ever: no read timeout
        assert hung[0].returncode == 4, err[-3000:]
        assert "every other rank's heartbeat is live, so none died or froze: rank 1 waits for its data loader" in err
        timed = _start_two_ranks(
            tmp_path / "timed", teacher_dir, demo_shards, "stall_in_data@2:1", "data.read_timeout_s=5"
        )
        errs = [p.communicate(timeout=300)[1] for p in timed]
    finally:
        _kill_all(hung + (timed or []))
    for r, (proc, err) in enumerate(zip(timed, errs)):
        assert proc.returncode == 5, err[-3000:]
        said = f"istack_ds: rank {r}: the data stream failed: rank 1: DataLoader worker 0 gave no batch in 5 s"
        assert said in err and str(demo_shards / "train") in err, err[-3000:]
