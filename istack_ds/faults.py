"""Fault injection for the resilience tests, off unless ISTACK_FAULTS is set.

``ISTACK_FAULTS="nan@5,6;crash_in_save@8;die@6:1;hang_in_backward@7:1"`` makes the loss
non-finite at steps 5 and 6, kills the process in the middle of the save at step 8, kills
rank 1 with SIGKILL at step 6, and freezes rank 1 (SIGSTOP) inside the backward pass of
step 7. Each entry is ``kind@step[,step...][:rank]``. The hooks sit where a real fault
would strike, so the tests exercise the real recovery paths.

Kinds:
    nan, nan_all          the loss of the step's first micro-batch / of every micro-batch is NaN
    crash_in_save         the process exits (code 17) in the middle of the step's checkpoint save
    stall_in_data         a DataLoader worker's `step`-th batch never comes (its read hangs until the rank ends)
    disk_full             the step's rank file is written to /dev/full: ENOSPC, as on a full disk
    disk_full_deepspeed   DeepSpeed's write of the step's optimizer-state file fails with ENOSPC (inside its
                          save_checkpoint, a collective: the other ranks' writes succeed)
    die                   SIGKILL at the start of the step
    die_in_backward,      SIGKILL / SIGSTOP inside ``engine.backward`` (the peers are in ZeRO's
    hang_in_backward      gradient reduce)
    die_in_growth,        SIGKILL / SIGSTOP inside the growth before the step, between its full-state
    hang_in_growth        gathers and the new engine (the peers are in the new engine's first collectives)

A hung (SIGSTOPped) process keeps its sockets open, as a rank stuck in a driver or on a
swapping host does, so its peers see no error: only a collective timeout ends their wait.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import torch

from .dist import rank as this_rank

SIGNALS = {"die": signal.SIGKILL, "hang": signal.SIGSTOP}
"""What each process-stopping kind sends to its own process."""


def _parse(spec: str) -> list[tuple[str, set[int], int | None]]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        kind, _, rest = entry.partition("@")
        steps, _, rank = rest.partition(":")
        out.append((kind, {int(s) for s in steps.split(",") if s}, int(rank) if rank else None))
    return out


def active(kind: str, step: int) -> bool:
    spec = os.environ.get("ISTACK_FAULTS")
    if not spec:
        return False
    rank = this_rank()
    return any(k == kind and step in steps and (r is None or r == rank) for k, steps, r in _parse(spec))


def maybe(kind: str, step: int) -> None:
    """Strikes a process-ending fault when one is configured for this step.

    ``die*`` kinds SIGKILL the process, ``hang*`` kinds SIGSTOP it, any other kind
    (``crash_in_save``) exits with code 17.
    """
    if active(kind, step):
        sig = SIGNALS.get(kind.partition("_in_")[0])
        if sig is not None:
            os.kill(os.getpid(), sig)
            return  # a SIGSTOPped process that is continued goes on where it stopped
        os._exit(17)


def stall(place: str, step: int) -> None:
    """``stall_in_<place>``: the process waits here while its parent lives (a read hung on a network file system;
    its DataLoader worker ends with the rank)."""
    if active(f"stall_in_{place}", step):
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(0.5)


def disk_full(file: Path, step: int) -> None:
    """``disk_full``: `file` becomes a link to /dev/full, so its writes fail with ENOSPC from the kernel."""
    if active("disk_full", step):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.unlink(missing_ok=True)
        file.symlink_to("/dev/full")


def disk_full_deepspeed(file: Path, step: int) -> None:
    """``disk_full_deepspeed``: called by the guard around DeepSpeed's checkpoint writes before each; the write of
    an optimizer-state `file` raises ENOSPC, as torch.save's on a full disk."""
    if active("disk_full_deepspeed", step) and "optim_states" in file.name:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))


def stop_here(place: str, step: int) -> None:
    """Strikes ``die_in_<place>`` or ``hang_in_<place>`` when one is configured for this step."""
    for what in SIGNALS:
        maybe(f"{what}_in_{place}", step)


def in_backward(loss: torch.Tensor, step: int) -> None:
    """Arms ``die_in_backward`` / ``hang_in_backward``: they strike when backward reaches `loss`'s gradient.

    That is inside ``engine.backward``, after the peers entered theirs: they go on into ZeRO's
    gradient reduce and wait there for this rank.
    """
    if loss.requires_grad and any(active(f"{what}_in_backward", step) for what in SIGNALS):
        loss.register_hook(lambda grad: stop_here("backward", step))
