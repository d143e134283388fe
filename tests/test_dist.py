"""istack_ds/dist.py and startup.py: every process group gets the configured timeout; heartbeats name the ranks
that stopped; a run builds no unused DeepSpeed op and meets on a free port (issue 24 items 1, 2)."""

import importlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch.distributed as tdist

from istack_ds import startup
from istack_ds.config import ConfigError
from istack_ds.dist import HEARTBEAT_KEY, init_distributed, silent_ranks
from tests.helpers import ROOT, free_port, ranks_env

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_PROCID", "MASTER_ADDR")
LAUNCHER_VARS += ("MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", startup.SHM_COMM_ENV)


@pytest.fixture
def plain_env(monkeypatch):
    """A process no launcher started; whatever the code under test sets in os.environ is dropped afterwards."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS})


# One process, one rank: the timeouts of the default group, of DeepSpeed's data-parallel group (ZeRO's
# gradient reduce and growth's gathers run on it) and of any later new_group.
GROUP_TIMEOUTS = """
import torch, torch.distributed as dist
from deepspeed.utils import groups
from istack_ds.dist import init_distributed
init_distributed(timeout_s=7)
timeout = lambda g: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
print(timeout(dist.group.WORLD), timeout(groups._get_data_parallel_group()), timeout(dist.new_group([0])))
"""


@pytest.mark.procgroup
def test_every_process_group_gets_the_configured_timeout():
    env = ranks_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        [sys.executable, "-c", GROUP_TIMEOUTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    default, data_parallel, later = map(float, proc.stdout.split()[-3:])
    assert (default, data_parallel, later) == (7.0, 7.0, 7.0)


def test_silent_ranks_are_those_whose_heartbeat_stopped():
    store = tdist.HashStore()
    store.set(HEARTBEAT_KEY.format(rank=1), "100.000")  # beat once, then stopped
    stop = threading.Event()

    def beat():  # rank 2 keeps beating
        while not stop.is_set():
            store.set(HEARTBEAT_KEY.format(rank=2), f"{time.time():.3f}")
            time.sleep(0.02)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        silent = silent_ranks(store, [1, 2, 3], wait_s=0.3)
    finally:
        stop.set()
        beater.join()
    assert silent == {1: 100.0, 3: None}  # rank 3 never wrote one


def test_init_distributed_builds_no_shm_op_unless_asked(plain_env, monkeypatch):
    """Issue 24 item 1: the run path (not only tests) stops DeepSpeed from JIT-building its unused
    deepspeed_shm_comm op, minutes of silent g++ at the first start; ISTACK_SHM_COMM=1 lets DeepSpeed build it."""
    import deepspeed

    comm = importlib.import_module("deepspeed.comm.torch")
    real = comm.build_shm_op
    monkeypatch.setattr(comm, "build_shm_op", real)  # restored after the test
    from deepspeed.ops.op_builder.builder import OpBuilder

    monkeypatch.setattr(OpBuilder, "jit_load", OpBuilder.jit_load)
    seen = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.append(comm.build_shm_op is real))

    init_distributed()
    assert seen == [False] and comm.build_shm_op() is None  # stubbed before DeepSpeed's backend starts

    monkeypatch.setattr(comm, "build_shm_op", real)
    os.environ[startup.SHM_COMM_ENV] = "1"
    init_distributed()
    assert seen == [False, True]


def test_a_jit_op_build_is_announced_once(monkeypatch, caplog):
    """Issue 24 item 1: any op DeepSpeed still compiles just in time logs one line first (what, why), not a
    silent wait."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    built = []
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: built.append(self.name) or "module")
    caplog.set_level(logging.INFO, logger="istack_ds")
    startup.announce_op_builds()
    startup.announce_op_builds()  # idempotent: one wrapper
    assert OpBuilder.jit_load(SimpleNamespace(name="cpu_adam")) == "module"
    OpBuilder.jit_load(SimpleNamespace(name="deepspeed_shm_comm"))  # asked for with ISTACK_SHM_COMM=1
    assert built == ["cpu_adam", "deepspeed_shm_comm"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "cpu_adam op just in time (DeepSpeed needs it and no prebuilt" in lines[0]
    assert "deepspeed_shm_comm op just in time (ISTACK_SHM_COMM=1 asks for it" in lines[1]


def test_a_single_process_meets_on_a_free_port_unless_master_port_is_set(plain_env):
    """Issue 24 item 2: `istack train` without a launcher used port 29500 whatever else held it."""
    startup.single_process_env()
    port = int(os.environ["MASTER_PORT"])
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1") and not startup.port_in_use(port)
    os.environ.pop("RANK")
    os.environ["MASTER_PORT"] = "23456"
    startup.single_process_env()
    assert os.environ["MASTER_PORT"] == "23456"


def test_a_busy_master_port_is_refused_naming_it(plain_env):
    """Issue 24 item 2: a port another process listens on stops rank 0 before any process group, one line naming
    it, instead of an EADDRINUSE traceback from every rank; ranks that do not host the store are not checked."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
        with pytest.raises(
            ConfigError, match=rf"^port {port} \(MASTER_PORT, or the launcher's --master_port\) is in use"
        ):
            startup.check_master_port()
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # torchrun: its agent hosts the store
        startup.check_master_port()
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE")
        os.environ["RANK"] = "1"
        startup.check_master_port()
    os.environ["RANK"] = "0"
    startup.check_master_port()  # free again


@pytest.mark.parametrize("master_port", [None, "23457"])
def test_the_demo_passes_a_free_port_to_the_launcher(tmp_path, master_port):
    """Issue 24 item 2: launchers/demo.sh gave the deepspeed launcher no port (its fixed 29500), so a second demo
    died. Stand-ins for python and deepspeed record what the script runs; MASTER_PORT, when set, is honoured."""
    (tmp_path / "python").write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} "$@"\nexit 0\n')
    (tmp_path / "deepspeed").write_text('#!/bin/sh\necho "deepspeed $*"\n')
    for name in ("python", "deepspeed"):
        (tmp_path / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"} | {"PY": str(tmp_path / "python")}
    if master_port:
        env["MASTER_PORT"] = master_port
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers/demo.sh"), "--set", "run.out_dir=runs/demoA"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    launch = next(line.split() for line in proc.stdout.splitlines() if line.startswith("deepspeed "))
    port = launch[launch.index("--master_port") + 1]
    assert port == master_port if master_port else (port.isdigit() and port != "29500")
    assert "runs/demoA/tb" in proc.stdout  # the closing line names the run's own directory
