"""Rank-aware helpers. Collectives are called on every rank; only human-facing output is rank-0."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("istack_ds")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Waits for every rank (a collective; nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def log0(msg: str, *args) -> None:
    """Logs on rank 0 only (every rank may call it)."""
    if is_main():
        log.info(msg, *args)


def setup_logging() -> None:
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [r{rank()}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import warnings

    import transformers

    # One progress line per interval is ours; per-load progress bars and deprecation chatter are noise.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


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


def ranks_per_node(world: int) -> int:
    """Ranks on each node: $LOCAL_WORLD_SIZE when it divides `world`, else all ranks on one node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return per_node if per_node > 0 and world % per_node == 0 else world


def topology() -> dict:
    """Nodes and ranks per node of this job (from the launcher's variables)."""
    world = world_size()
    per_node = ranks_per_node(world)
    return {"nodes": world // per_node, "ranks_per_node": per_node, "world_size": world}


def init_distributed(timeout_s: int | None = None) -> None:
    """Starts the process group once per process (gloo on CPU, nccl on GPU); a no-op when it exists.

    Works under the deepspeed launcher, torchrun and Slurm (srun sets SLURM_* instead of RANK);
    a plain `python` run becomes rank 0 of 1. `timeout_s` bounds every collective of the default
    group, so a dead rank cannot hang the rest (None: torch's default).
    """
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    normalize_launcher_env()
    if "RANK" not in os.environ:  # a plain `python launchers/train.py`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
    bind_device()
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend=backend(), **kwargs)


def skip_shm_build() -> None:
    """Stops DeepSpeed from compiling its shared-memory comm op (a g++ build at the first start).

    That op serves only multi-rank inference all-reduce, which nothing here uses; tests and
    benchmarks call this before the process group starts.
    NOTE: the module is fetched by name: `import deepspeed.comm.torch as m` binds the real `torch`.
    """
    import importlib
    from typing import Any

    comm: Any = importlib.import_module("deepspeed.comm.torch")
    comm.build_shm_op = lambda: None


def backend() -> str:
    """The collective backend of DeepSpeed's accelerator: gloo on the CPU one, its own (nccl on CUDA) otherwise.

    Chosen by the accelerator, not by whether a GPU is visible: DS_ACCELERATOR=cpu on a GPU
    host runs CPU tensors, which nccl cannot carry.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()


def bind_device() -> None:
    """Makes this rank's own GPU (LOCAL_RANK) the current device before anything is put on one.

    NOTE: without it every rank of a node would build its teacher and batches on GPU 0
    (DeepSpeed binds the device only inside deepspeed.initialize, after the teacher exists).
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def comm_device() -> torch.device:
    """Where collective tensors must live: the GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sums a dict of floats over ranks (a collective: call it on every rank, same keys)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_ranks(flag: bool) -> bool:
    """True when `flag` is true on every rank (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
