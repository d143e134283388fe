"""One run per run directory (istack_ds/run_lock.py): a second run into the directory of a running one is
refused naming the holder, before it writes anything; a dead holder's lock on this host is taken over."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from istack_ds import run_lock
from istack_ds.config import load_config
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """A plain single-process job, whatever the environment pytest runs in."""
    for var in (
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "RANK",
        "SLURM_PROCID",
        "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def holder(tmp_path):
    """A live process of a run (Slurm job 4242) holding the lock of tmp_path/run, until the test ends."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from istack_ds.run_lock import acquire
        acquire({str(tmp_path / "run")!r})
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    env = dict(os.environ, SLURM_JOB_ID="4242", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path, holder):
    out = tmp_path / "run"
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.acquire(out)
    message = str(e.value)
    for part in (f"host {socket.gethostname()}", f"pid {holder.pid}", "Slurm job 4242", str(out / ".istack.lock")):
        assert part in message
    # what commands/train.py calls: the same refusal, as a message every rank gets
    assert f"pid {holder.pid}" in run_lock.lock_run(out)
    assert json.loads((out / ".istack.lock").read_text())["pid"] == holder.pid  # the holder's lock is untouched


def test_train_refuses_before_it_writes_anything(tmp_path, holder, monkeypatch, capsys):
    """`istack train`'s train(): exit 2 naming the holder; no Trainer is built, so no config.yaml is written."""
    from istack_ds import dist, trainer
    from istack_ds.commands import train

    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/demo.yaml", [f"run.out_dir={out}"])
    monkeypatch.setattr(dist, "init_distributed", lambda *_: None)  # one process: no process group needed

    def no_trainer(*_):
        raise AssertionError("the Trainer was built in a directory held by another run")

    monkeypatch.setattr(trainer, "Trainer", no_trainer)
    assert train.train(cfg) == 2
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".istack.lock"]


def test_the_lock_is_released_by_its_holder_only(tmp_path):
    out = tmp_path / "run"
    path = run_lock.acquire(out)
    holder = json.loads(path.read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(run_lock.RunLockError, match="running run"):
        run_lock.acquire(out)  # held by this very process: still refused
    run_lock.release(path)
    assert not path.exists()
    run_lock.release(run_lock.acquire(out))  # free again


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "job": None, "started": "yesterday"}
    (out / ".istack.lock").write_text(json.dumps(stale))
    lines = []
    path = run_lock.acquire(out, log=lines.append)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "stale" in lines[0] and f"pid {dead.pid}" in lines[0]
    run_lock.release(path)


def test_a_killed_holder_not_yet_reaped_is_gone(tmp_path, holder):
    """A rank 0 killed by SIGKILL stays a zombie until its parent reaps it: its lock is stale already."""
    holder.kill()
    for _ in range(500):  # the test is its parent and does not reap it yet
        if run_lock._proc_stat(holder.pid)[0] == "Z":
            break
        time.sleep(0.01)
    path = run_lock.acquire(tmp_path / "run", log=lambda _: None)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    run_lock.release(path)


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """A live process with the holder's pid but another start time is not the holder."""
    out = tmp_path / "run"
    out.mkdir()
    stale = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": "1", "started": "at boot"}
    (out / ".istack.lock").write_text(json.dumps(stale))
    run_lock.release(run_lock.acquire(out, log=lambda _: None))


def test_a_holder_on_another_host_is_not_judged(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = {"host": "node-elsewhere", "pid": 1, "job": "77", "started": "today"}
    (out / ".istack.lock").write_text(json.dumps(other))
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.acquire(out)
    assert "node-elsewhere" in str(e.value) and "Slurm job 77" in str(e.value) and "remove" in str(e.value)
    assert json.loads((out / ".istack.lock").read_text()) == other


def test_the_lock_of_an_earlier_run_of_this_slurm_job_is_taken_over_on_any_host(tmp_path, monkeypatch):
    """A requeued job (same SLURM_JOB_ID, SLURM_RESTART_COUNT one higher) found its own lock from a node that was
    killed (SIGKILL after the grace time, a node failure) and was refused for ever."""
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"host": "node-elsewhere", "pid": 1, "job": "77", "restart": 0, "started": "yesterday"}
    (out / ".istack.lock").write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with pytest.raises(run_lock.RunLockError):  # the same run of the job (no restart count): never taken over
        run_lock.acquire(out)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lines = []
    path = run_lock.acquire(out, log=lines.append)
    assert json.loads(path.read_text())["restart"] == 1
    assert len(lines) == 1 and "was run 0 of Slurm job 77, requeued since (this is run 1)" in lines[0]
    run_lock.release(path)
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's lock on another host: refused as before
    (out / ".istack.lock").write_text(json.dumps(earlier))
    with pytest.raises(run_lock.RunLockError):
        run_lock.acquire(out)
