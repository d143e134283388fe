"""Preemption (istack_ds/preemption.py, issue 23 item 2): SIGTERM / SIGUSR1 make every rank save at the next step
boundary and exit 7; a second SIGTERM or a grace period that runs out ends the rank at once (exit 8); a rank whose
launcher died stops; DataLoader workers forked from a rank ignore the signal.

The process-level cases run small scripts (no process group); the run itself is real: launchers/train.py on 2 gloo
ranks, one of which gets SIGTERM mid-training, then resumed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from istack_ds.preemption import NOT_SAVED, PREEMPTED
from tests.helpers import ROOT, TOTAL, child_env, free_port, ranks_env, run_args, torchrun

# A process that arms the handlers and then waits, as a rank waits in a collective.
ARMED = """
import sys, threading
sys.path.insert(0, {root!r})
from istack_ds import preemption
preemption.install({grace}, 0, {world})
print("armed", flush=True)
{then}
"""


def _script(tmp_path: Path, name: str, grace: float = 60, world: int = 1, then: str = "threading.Event().wait()"):
    path = tmp_path / name
    path.write_text(ARMED.format(root=str(ROOT), grace=grace, world=world, then=textwrap.dedent(then)))
    return path


def _start(script: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "armed", proc.communicate()
    return proc


def test_a_second_sigterm_ends_the_process_at_once(tmp_path):
    proc = _start(_script(tmp_path, "wait.py"))
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None  # the first one only asks for a checkpoint at the next step boundary
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == NOT_SAVED, err
    assert "SIGTERM: a checkpoint at the end of this step on every rank, then exit 7" in err
    assert "a second SIGTERM: exiting now without a new checkpoint (exit 8)" in err


def test_a_second_sigusr1_changes_nothing_and_the_grace_period_ends_the_process(tmp_path):
    proc = _start(_script(tmp_path, "wait.py", grace=2))
    start = time.time()
    proc.send_signal(signal.SIGUSR1)
    assert "SIGUSR1: a checkpoint at the end of this step" in proc.stderr.readline()  # recorded: the next is second
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == NOT_SAVED, err
    assert time.time() - start >= 2
    assert "did not end within checkpoint.preempt_grace_s=2 s" in err


def test_the_grace_period_holds_when_stderr_is_gone(tmp_path):
    """A launcher that died takes the rank's stderr with it: the message fails, the bound on the exit must not."""
    proc = _start(_script(tmp_path, "wait.py", grace=2))
    proc.stderr.close()  # writes to it now fail (a broken pipe)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=20) == NOT_SAVED


# Starts a rank under a launcher (a shell), SIGKILLs the launcher and prints the rank's exit code: the orphaned rank
# is reparented to this process (PR_SET_CHILD_SUBREAPER, Linux), which can wait for it.
ORPHANED = """
import ctypes, os, signal, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
launcher = subprocess.Popen(["bash", "-c", "{python} {rank} & wait"], stdout=subprocess.PIPE, text=True)
assert launcher.stdout.readline().strip() == "armed"
pid = int(launcher.stdout.readline())
if {sigterm_first}:
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)  # recorded before the launcher dies
launcher.kill()
launcher.wait()
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.mark.parametrize("sigterm_first", [False, True], ids=["launcher-killed", "sigterm-then-launcher-killed"])
def test_a_rank_whose_launcher_died_is_asked_to_stop_and_saves(tmp_path, sigterm_first):
    """The launcher is SIGKILLed: the rank gets SIGTERM from the kernel, and its parent poll sees the same death; one
    event, which asks for a stop (none was asked yet) and is never a second SIGTERM (exit 8 without the save the
    README promises). Here the rank's step and save outlast a parent poll."""
    seen = tmp_path / "seen"
    rank = _script(
        tmp_path,
        "rank.py",
        world=2,
        then=f"""
        import os, time, pathlib
        print(os.getpid(), flush=True)
        while not preemption.requested():
            time.sleep(0.05)
        time.sleep(preemption.POLL_S + 1.5)  # the step and its save
        pathlib.Path({str(seen)!r}).write_text(str(preemption.requested()))
        sys.exit(preemption.PREEMPTED)
        """,
    )
    harness = tmp_path / "orphaned.py"
    harness.write_text(ORPHANED.format(python=sys.executable, rank=rank, sigterm_first=sigterm_first))
    done = subprocess.run(
        [sys.executable, str(harness)], env=child_env(), capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == [str(PREEMPTED)], done.stderr
    assert seen.read_text() == str(int(signal.SIGTERM))
    assert "second SIGTERM" not in done.stderr


@pytest.mark.parametrize("saved", [False, True], ids=["before-the-save", "after-the-save"])
def test_a_sigterm_after_every_rank_saved_exits_7_and_before_it_8(monkeypatch, capsys, saved):
    """A launcher ends the ranks still shutting down after one exited 7 (DeepSpeed's on any non-zero exit,
    torchrun's close): that SIGTERM was a "second signal", exit 8 and "without a new checkpoint" though it was
    saved. So is a grace period that runs out in the exit after the save."""
    from istack_ds import preemption

    exits: list[int] = []
    monkeypatch.setattr(preemption, "_hard_exit", exits.append)
    watch = preemption._Watch(-1, 1000, 0, None)
    monkeypatch.setattr(preemption, "_watch", watch)
    watch.got(signal.SIGTERM, "SIGTERM")
    watch.timer.cancel()
    if saved:
        trainer = type("Trainer", (), {"step": 3, "save": lambda self: Path("step3"), "close": lambda self: None})()
        with pytest.raises(preemption.Preempted, match="checkpoint step3 saved"):
            preemption.stop_if_requested(trainer)
    watch.got(signal.SIGTERM, "SIGTERM")
    watch.expire()
    code = PREEMPTED if saved else NOT_SAVED
    assert exits == [code, code]
    assert ("without a new checkpoint" in capsys.readouterr().err) is not saved


def test_a_process_forked_from_a_rank_keeps_the_default_actions_and_leaves_the_ranks_pipe_alone(tmp_path):
    """Its signals are its own: the rank hears nothing of them, and a SIGTERM ends it as usual (multiprocessing
    terminates and joins its children at exit: one that ignored SIGTERM would hang the rank's exit)."""
    proc = _start(
        _script(
            tmp_path,
            "fork.py",
            then="""
            import multiprocessing, os, signal, time
            child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
            child.start()
            time.sleep(0.5)  # the child has run its at-fork hooks
            os.kill(child.pid, signal.SIGUSR1)
            child.join(5)
            time.sleep(0.5)
            print(child.exitcode, preemption.requested(), flush=True)
            """,
        )
    )
    out, err = proc.communicate(timeout=30)
    assert out.split() == [str(-signal.SIGUSR1), "0"], err


class _Slow:
    """An iterable dataset of batches 0, 1, 2, one every 0.3 s (time for a signal between two items)."""

    def __iter__(self):
        for i in range(3):
            time.sleep(0.3)
            yield {"i": i}


def _slow_start(worker_id: int) -> None:
    """A worker_init_fn whose worker starts slowly: a launcher's signals may come before ignore_in_worker."""
    from istack_ds.preemption import ignore_in_worker

    time.sleep(1.0)
    ignore_in_worker(worker_id)


def test_a_dataloader_worker_survives_sigterm_and_sigusr1_from_another_process_from_its_start_on():
    """torch's worker loop dies of a SIGTERM sent by anyone but its rank (its own C handler), and of a SIGUSR1
    (default action) before its worker_init_fn ran; a launcher that signals the rank's process tree (DeepSpeed's,
    torchrun, Slurm's USR1) killed it, at its start too (workers restart at each validation and epoch), and the
    rank's next batch raised. The rank's loader starts its workers with both blocked."""
    import multiprocessing

    import torch

    from istack_ds.data.loader import ShardLoader

    dataset = type("SlowStream", (_Slow, torch.utils.data.IterableDataset), {})()
    before = set(multiprocessing.active_children())
    batches = iter(ShardLoader(dataset, batch_size=None, num_workers=1, worker_init_fn=_slow_start))
    [worker] = set(multiprocessing.active_children()) - before
    for sig in ("-TERM", "-USR1"):  # during its start, sent by another process
        subprocess.run(["kill", sig, str(worker.pid)], check=True)
    assert next(batches)["i"] == 0
    for sig in ("-TERM", "-USR1"):  # while it runs
        subprocess.run(["kill", sig, str(worker.pid)], check=True)
    assert next(batches)["i"] == 1
    worker.terminate()  # its rank's SIGTERM (multiprocessing's at the rank's exit) still ends it
    worker.join(timeout=10)
    assert worker.exitcode == 0


def test_a_rank_starting_its_workers_still_takes_its_signals(tmp_path):
    """The rank's thread that starts the workers blocks SIGTERM / SIGUSR1 meanwhile: a signal then is not lost or
    delayed, the reading thread takes it."""
    proc = _start(
        _script(
            tmp_path,
            "blocked.py",
            then="""
            import os, signal, time
            with preemption.signals_blocked():
                os.kill(os.getpid(), signal.SIGUSR1)
                for _ in range(100):
                    if preemption.requested():
                        break
                    time.sleep(0.05)
                print(preemption.requested(), flush=True)
            """,
        )
    )
    out, err = proc.communicate(timeout=30)
    assert out.split() == [str(int(signal.SIGUSR1))], err


# ---- the run: 2 gloo ranks, SIGTERM to one of them ---------------------------------------------------------


def _rank(out, teacher_dir, demo_shards, r: int, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = ranks_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launchers/train.py"), *run_args(out, teacher_dir, demo_shards, *extra)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )


@pytest.mark.procgroup
def test_sigterm_to_one_rank_saves_that_step_on_every_rank_and_the_resume_goes_on_from_it(
    tmp_path, teacher_dir, demo_shards
):
    """Issue 23, 2: SIGTERM killed the rank (and its launcher orphaned the others): up to checkpoint.every steps
    were lost at every preemption."""
    from istack_ds.checkpoint import verify

    out = tmp_path / "run"
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    procs = [_rank(out, teacher_dir, demo_shards, r, port, logs[r], "checkpoint.every=100") for r in (0, 1)]
    try:
        deadline = time.time() + 300
        while "step 3/" not in logs[0].read_text() and time.time() < deadline:  # mid-training
            assert procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err0, err1 = (log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [PREEMPTED, PREEMPTED], err0[-3000:] + err1[-3000:]
    stopped = re.search(r"rank 0: stopped by SIGTERM on rank 1 at step (\d+): checkpoint (\S+) saved", err0)
    assert stopped, err0[-3000:]
    step, path = int(stopped.group(1)), Path(stopped.group(2))
    assert 3 <= step < TOTAL and path == out / f"checkpoints/step{step:08d}"
    assert verify(path)["step"] == step  # complete, and its files are what was saved
    assert f"rank 1: stopped by SIGTERM on rank 1 at step {step}" in err1
    assert not (out / ".istack.lock").exists()  # released before the exit

    resumed = torchrun(ROOT / "launchers/train.py", *run_args(out, teacher_dir, demo_shards), timeout=300)
    assert f"resumed from {path}: step {step}" in resumed.stderr, resumed.stderr[-3000:]
    assert (out / "summary.json").exists()


# Runs a rank (its arguments) and prints its exit code; torchrun signals the process group, this wrapper lives on.
REPORT_EXIT = """
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: None)
code = subprocess.call([sys.executable, *sys.argv[1:]])
print(f"rank {os.environ['RANK']} exited {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""


@pytest.mark.procgroup
def test_sigterm_to_torchrun_reaches_every_rank_which_saves_and_exits_7(tmp_path, teacher_dir, demo_shards):
    """The launcher forwards SIGTERM to each rank (and SIGKILLs them 30 s later): each rank gets it (its own line),
    each saves the same step and exits 7 (torchrun reports no code of a rank it stopped: a wrapper prints it)."""
    from istack_ds.checkpoint import verify

    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    wrapper = tmp_path / "report_exit.py"
    wrapper.write_text(REPORT_EXIT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    launcher = subprocess.Popen(
        [*cmd, str(ROOT / "launchers/train.py"), *run_args(out, teacher_dir, demo_shards, "checkpoint.every=100")],
        cwd=ROOT,
        env=ranks_env(),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        deadline = time.time() + 300
        while "step 3/" not in log.read_text() and time.time() < deadline:
            assert launcher.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    err = log.read_text()
    saved = {
        int(r): (int(step), path)
        for r, step, path in re.findall(
            r"rank (\d): stopped by SIGTERM on rank .* at step (\d+): checkpoint (\S+)", err
        )
    }
    assert sorted(saved) == [0, 1] and saved[0] == saved[1], err[-3000:]
    for r in (0, 1):  # printed by the rank that got the signal itself (the all-reduce tells the others)
        assert f"rank {r}: SIGTERM: a checkpoint at the end of this step on every rank" in err, err[-3000:]
    assert sorted(re.findall(r"rank (\d) exited (-?\d+)", err)) == [("0", "7"), ("1", "7")], err[-3000:]
    step, path = saved[0]
    assert verify(path)["step"] == step
