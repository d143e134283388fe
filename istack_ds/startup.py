"""What a rank sets up before its process group starts: the launcher's variables, the master port, and which
DeepSpeed ops it may build. Nothing here talks to another rank (:mod:`istack_ds.dist` starts the group)."""

from __future__ import annotations

import errno
import logging
import os
import socket

from .config import ConfigError

log = logging.getLogger("istack_ds")


def log_main(msg: str, *args) -> None:
    """Logs on rank 0 only (before the process group: by the launcher's RANK)."""
    if os.environ.get("RANK", "0") == "0":
        log.info(msg, *args)


def normalize_launcher_env() -> None:
    """Gives every launcher's processes the same variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE.

    torchrun sets them all; the deepspeed launcher says LOCAL_SIZE for the ranks of a node;
    Slurm's srun sets only SLURM_* (MASTER_ADDR / MASTER_PORT come from the batch script).
    LOCAL_WORLD_SIZE lets the data split by node first, then by rank within the node.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if tasks_per_node.isdigit():
            env.setdefault("LOCAL_WORLD_SIZE", tasks_per_node)
    if "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env:
        env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]


def single_process_env() -> None:
    """A plain `istack train` / `python launchers/train.py` (no launcher variables) becomes rank 0 of 1, on a
    free port unless MASTER_PORT is set (a fixed default collides with any other job on the machine)."""
    normalize_launcher_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if not os.environ.get("MASTER_PORT"):
            os.environ["MASTER_PORT"] = str(free_port())


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """True when some process listens on `port` (on any address), so rank 0 could not host the store there."""
    with socket.socket() as s:
        # NOTE: SO_REUSEADDR as torch's TCPStore sets it: a port left in TIME_WAIT by an ended job is free to it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def check_master_port() -> None:
    """Sets a free MASTER_PORT for a single process (:func:`single_process_env`); refuses a busy port this
    process would host the job's store on, with one line naming it (ConfigError), before any process group.

    Rank 0 hosts the store under the deepspeed launcher, srun and a plain process; under torchrun its agent
    does (the workers connect to it), so there is nothing to check there.
    """
    single_process_env()
    port = os.environ.get("MASTER_PORT", "")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # as torch.distributed.rendezvous
    if os.environ.get("RANK", "0") != "0" or agent_store or not port.isdigit():
        return
    if port_in_use(int(port)):
        raise ConfigError(
            f"port {port} (MASTER_PORT, or the launcher's --master_port) is in use by another process, another "
            "job's perhaps: choose a free one, or leave MASTER_PORT unset (`istack train` alone and "
            "launchers/demo.sh then pick a free port)"
        )


SHM_COMM_ENV = "ISTACK_SHM_COMM"
"""Set to 1 to have DeepSpeed build and use its shared-memory comm op (:func:`prepare_ops`)."""
WHY_BUILT = {"deepspeed_shm_comm": f"{SHM_COMM_ENV}=1 asks for it: shared-memory all-reduce between CPU ranks"}
"""Why an op is built, by its DeepSpeed name, for the line that announces the build."""


def prepare_ops() -> None:
    """Decides which DeepSpeed ops the run may build, before the process group starts.

    DeepSpeed's shared-memory comm op (deepspeed_shm_comm) is skipped unless ISTACK_SHM_COMM=1: it serves
    only multi-rank inference all-reduce on CPU, which nothing here calls, and building it costs every rank
    a g++ build of a minute or two at the first start (two runs building it at once can fail). Any op
    DeepSpeed still builds just in time says so in one line (:func:`announce_op_builds`).
    """
    if os.environ.get(SHM_COMM_ENV) != "1":
        skip_shm_build()
    announce_op_builds()


def announce_op_builds() -> None:
    """Makes every just-in-time build of a DeepSpeed op log one line first (rank 0): what is built, why, and
    that it may take minutes, instead of a silent wait."""
    from typing import Any

    from deepspeed.ops.op_builder.builder import OpBuilder

    jit_load: Any = OpBuilder.jit_load
    if getattr(jit_load, "announces", False):
        return

    def announced(self, *args, **kwargs):
        log_main(
            "DeepSpeed loads its %s op just in time (%s): compiled with the C++ compiler and ninja the first "
            "time, a minute or more, then taken from the torch extensions cache",
            self.name,
            WHY_BUILT.get(self.name, "DeepSpeed needs it and no prebuilt one is installed"),
        )
        return jit_load(self, *args, **kwargs)

    announced.announces = True  # type: ignore[attr-defined]
    OpBuilder.jit_load = announced


def skip_shm_build() -> None:
    """Stops DeepSpeed from compiling its shared-memory comm op (a g++ build at the first start).

    That op serves only multi-rank inference all-reduce, which nothing here uses; :func:`init_distributed`
    calls this (unless ISTACK_SHM_COMM=1), tests and benchmarks too.
    NOTE: the module is fetched by name: `import deepspeed.comm.torch as m` binds the real `torch`.
    """
    import importlib
    from typing import Any

    comm: Any = importlib.import_module("deepspeed.comm.torch")
    comm.build_shm_op = lambda: None
