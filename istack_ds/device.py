"""The device the ranks compute on: chosen from ``run.device`` and checked before any process group, each rank's
GPU index, the words the start line says about it, and the optimizer states kept on their parameters' device.

NOTE: torch without CUDA (a CPU wheel, a driver older than the wheel's CUDA) makes DeepSpeed fall back to its
CPU accelerator with one warning line, and the job then trains on gloo: ``run.device=cuda`` refuses that
instead (:func:`check_run_device`), naming the torch build.
"""

from __future__ import annotations

import os
import sys

import torch

from .config import Config, ConfigError


def resolved_device(requested: str) -> str:
    """`cuda` or `cpu`: `requested` itself, or for `auto` cuda when torch.cuda.is_available(), else cpu."""
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_build() -> str:
    """The torch build and what it sees of CUDA, in the words a refusal uses."""
    return (
        f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU-only build'}), "
        f"torch.cuda.is_available()={torch.cuda.is_available()}"
    )


def check_run_device(cfg: Config) -> None:
    """``run.device`` can be had, and DeepSpeed's accelerator is the same device (ConfigError otherwise).

    With DS_ACCELERATOR unset and DeepSpeed not imported yet, DS_ACCELERATOR is set to the device, so a `cpu` run
    on a GPU host does not become a CUDA one. Called before any process group (preflight).
    """
    requested = cfg.run.device
    device = resolved_device(requested)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"run.device=cuda but {torch_build()}: this job would train on the CPU. Install the CUDA build of "
            "torch that the driver supports (README, GPU), or set run.device=cpu"
        )
    if "deepspeed" not in sys.modules and not os.environ.get("DS_ACCELERATOR"):
        # NOTE: before DeepSpeed's import, which chooses its accelerator once (with torch.cuda, not run.device)
        os.environ["DS_ACCELERATOR"] = device
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if accelerator != device:
        raise ConfigError(
            f"run.device={requested} means {device}, but DeepSpeed's accelerator is {accelerator} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'unset')}; {torch_build()}): set "
            f"DS_ACCELERATOR={device}, or run.device={accelerator}"
        )


def describe_device(cfg: Config, ranks: int) -> str:
    """The device of the start line: which, how many the ranks use, and the precision of student and teacher."""
    device = resolved_device(cfg.run.device)
    if device == "cuda" and torch.cuda.is_available():
        where = f"cuda ({torch.cuda.get_device_name()}), {ranks} GPU(s), {torch.cuda.device_count()} visible per rank"
    else:
        where = f"cpu, {ranks} process(es)"
    return f"{where}; student {cfg.deepspeed.precision}, teacher {cfg.teacher.dtype} (run.device={cfg.run.device})"


def local_device_index(local_rank: int, visible: int) -> int:
    """The index of this rank's GPU among the `visible` ones: its LOCAL_RANK, or 0 when the launcher gives each
    task exactly one device (Slurm's per-task GPU binding: LOCAL_RANK 3 and CUDA_VISIBLE_DEVICES of one)."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this rank sees {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give each rank of a node its "
        "own GPU (one visible device per task, or all of the node's devices to every task)"
    )


def settle_optimizer_states(optimizer) -> int:
    """After a load: every state tensor of `optimizer` (DeepSpeed's ZeRO optimizer or the torch one it wraps) its
    own, and on its parameter's device as torch's own ``Optimizer.load_state_dict`` places them; returns how many
    it replaced.

    NOTE: a universal checkpoint's load (DeepSpeed's base_optimizer.py, ZeRO-3's stage3.py) writes AdamW's `step`
    as a CPU tensor, which the fused CUDA kernel does not move; and ZeRO-3's gives every flat partition the SAME
    `step` tensor, which the fused kernel then increments once per partition (the second partition's bias
    correction runs a step ahead). `step` goes to the parameter's device only for a fused or capturable group
    (torch's rule: the other paths keep it on the CPU and read it there).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    # NOTE: from the state's keys and the groups' flags, not the groups' "params": ZeRO-3 empties those lists
    # between steps (istack_ds.zero_states reads them the same way).
    device_step = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    seen: set[int] = set()
    replaced = 0
    for p, state in inner.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            shared, device = id(value) in seen, p.device
            seen.add(id(value))
            if key == "step" and not device_step:
                device = value.device
            if device == value.device and not shared:
                continue
            dtype = torch.float32 if key == "step" else value.dtype
            state[key] = value.to(device=device, dtype=dtype, copy=True)
            replaced += 1
    return replaced
