"""Preemption: SIGTERM or SIGUSR1 to any rank makes every rank save a checkpoint at the next step boundary and
exit with code 7; a rank whose launcher died does the same.

**How a signal is seen.** :func:`install` gives SIGTERM and SIGUSR1 a Python handler that does nothing itself
and points :func:`signal.set_wakeup_fd` at a pipe: the interpreter's C-level handler writes the signal's number
there at once, whatever the main thread is doing (a collective, a save). A daemon thread reads the pipe: the first
signal is recorded (:func:`requested`) and starts the grace timer; a second SIGTERM ends the process at once
(exit 8, no new checkpoint), as does a grace period that runs out before the run stopped (a step or save that
cannot finish). A second SIGUSR1 changes nothing (Slurm may send USR1 before the time limit and SIGTERM at it).
Once every rank saved the stop's checkpoint, either ends the process with exit 7 instead: a launcher ends the
ranks still shutting down when the first one exits 7 (DeepSpeed's on any non-zero exit, torchrun's close).

**Every rank together.** :func:`stop_if_requested`, once per step in the training loop, all-reduces one small
integer per rank (which signal each rank got) on :func:`istack_ds.dist.control_group` (gloo, so under NCCL it
waits for no GPU work). Any non-zero entry makes every rank save the same step and raise :class:`Preempted`
(exit 7).

**Orphans.** Where a launcher started several ranks (WORLD_SIZE > 1), each rank asks the kernel for SIGTERM when
its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux): it arrives at once, even when the launcher was SIGKILLed,
and then runs the path above. The reading thread also compares ``os.getppid()`` with the parent it had just before
the prctl every POLL_S seconds, which covers a parent that died in between and systems without the prctl. The
kernel's SIGTERM and the poll see one event: it asks for a stop when none was asked yet and never counts as a
second SIGTERM, so the orphan saves and exits 7 as a preempted rank does. A single process (a run started from a
shell, perhaps under nohup) keeps running when its shell goes.

**Forked processes** do not write to the pipe (an at-fork hook) and keep the default actions. **DataLoader workers**
(:func:`ignore_in_worker`) ignore SIGTERM and SIGUSR1 from anyone but their rank: a launcher that signals the rank's
whole process tree (DeepSpeed's, torchrun's process group, Slurm's step) would otherwise kill them mid-step, and the
rank's DataLoader would raise instead of saving. They are started in :func:`signals_blocked` and so born with both
signals blocked: one that comes before ``ignore_in_worker`` runs waits for it. The rank's own SIGTERM (multiprocessing's
at the rank's exit) still ends them, and torch's worker watchdog ends them when the rank is gone.

NOTE: torchrun forwards SIGTERM to every rank and SIGKILLs them 30 s later; DeepSpeed's launcher (launch.py)
SIGTERMs one rank's process tree at a time and SIGKILLs it after 30 s before going on to the next (the others learn
of the stop through the all-reduce): a step and save longer than that are cut off there (the previous checkpoint is
resumed). A signal during the rank's start (a resume's load) starts the grace timer too: an exit 8 there loses
no trained step (the start trains none). Under srun the limit is Slurm's: the
sbatch script asks for SIGUSR1 600 s before the time limit (launchers/slurm_4node.sbatch); a preemption's SIGTERM
comes with the partition's grace time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

PREEMPTED = 7
"""Exit code: stopped by SIGTERM / SIGUSR1 (or the launcher's death) after saving a checkpoint of the step reached."""
NOT_SAVED = 8
"""Exit code: stopped by a signal without a new checkpoint (a second SIGTERM, or the grace period ran out)."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that ask for a checkpoint and an exit."""
POLL_S = 2.0
"""Seconds between two checks of the parent process."""
_PR_SET_PDEATHSIG = 1


class Preempted(RuntimeError):
    """Every rank saved a checkpoint and stops because a rank got SIGTERM / SIGUSR1; the message says which."""


def _hard_exit(code: int) -> None:
    """Ends the process now (from any thread), the run lock released first; see :mod:`istack_ds.process_exit`."""
    from .process_exit import exit_now

    exit_now(code)


class _Watch(threading.Thread):
    """Reads the signal numbers the interpreter writes into the wakeup pipe; checks the parent process."""

    def __init__(self, fd: int, grace_s: float, rank: int, ppid: int | None, pdeathsig: bool = False):
        super().__init__(name="istack_ds-preemption", daemon=True)
        self.fd, self.grace_s, self.rank, self.ppid = fd, grace_s, rank, ppid
        self.pdeathsig = pdeathsig
        """The kernel sends a SIGTERM when the parent dies (the prctl took effect while the parent lived)."""
        self.signum = 0
        """The first signal seen (0: none)."""
        self.parent_gone = False
        """The launcher's death was seen (by its SIGTERM from the kernel or by the poll)."""
        self.pdeathsig_due = False
        """The poll saw the death first: the kernel's SIGTERM that comes with it is still to be read."""
        self.saved = False
        """Every rank saved the checkpoint of the stop (:func:`stop_if_requested`): only the exit is left."""

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd], [], [], POLL_S)
            if ready:
                for signum in os.read(self.fd, 64):
                    if signum == signal.SIGTERM and self.parent_died(sigterm=True):
                        continue
                    if signum in SIGNALS:
                        self.got(signal.Signals(signum), signal.Signals(signum).name)
            else:
                self.parent_died()

    def parent_died(self, sigterm: bool = False) -> bool:
        """Sees the launcher's death once, however it shows: the kernel's SIGTERM (`sigterm`: one was just read)
        or the parent poll. It asks for a stop when none was asked yet and never counts as a second signal.
        True when `sigterm` was the kernel's SIGTERM of that death (taken here).

        NOTE: the kernel changes the parent and then queues its SIGTERM, so a SIGTERM read after the poll saw the
        death is that one (``pdeathsig_due``), as is a SIGTERM read when the parent already changed.
        """
        if self.ppid is None:
            return False
        if self.parent_gone:
            if sigterm and self.pdeathsig_due:
                self.pdeathsig_due = False
                return True
            return False
        if os.getppid() == self.ppid:
            return False
        self.parent_gone = True
        if sigterm and not self.pdeathsig:  # no SIGTERM comes from the kernel: this one is somebody's
            return False
        self.pdeathsig_due = self.pdeathsig and not sigterm
        if not self.signum:
            self.got(signal.SIGTERM, "its launcher (parent process) is gone")
        return sigterm

    def got(self, sig: signal.Signals, what: str) -> None:
        if not self.signum:
            self.signum = int(sig)
            self.timer = threading.Timer(self.grace_s, self.expire)  # first: the bound holds whatever say() meets
            self.timer.daemon = True
            self.timer.start()
            self.say(
                f"{what}: a checkpoint at the end of this step on every rank, then exit {PREEMPTED} "
                f"(within checkpoint.preempt_grace_s={self.grace_s:g} s, else exit {NOT_SAVED})"
            )
        elif sig == signal.SIGTERM and self.saved:  # a launcher ending the ranks that already stop (exit 7)
            self.say(f"SIGTERM after the checkpoint was saved: exiting now (exit {PREEMPTED})")
            _hard_exit(PREEMPTED)
        elif sig == signal.SIGTERM:
            self.say(f"a second SIGTERM: exiting now without a new checkpoint (exit {NOT_SAVED})")
            _hard_exit(NOT_SAVED)

    def expire(self) -> None:
        if self.saved:
            self.say(f"the checkpoint was saved but the exit took over {self.grace_s:g} s: exiting (exit {PREEMPTED})")
            _hard_exit(PREEMPTED)
            return
        self.say(
            f"the step and its checkpoint did not end within checkpoint.preempt_grace_s={self.grace_s:g} s: "
            f"exiting without a new checkpoint (exit {NOT_SAVED})"
        )
        _hard_exit(NOT_SAVED)

    def say(self, message: str) -> None:
        try:
            print(f"istack_ds: rank {self.rank}: {message}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr gone with the launcher: the exit must not depend on the message
            pass


_watch: _Watch | None = None


def _reset_in_child() -> None:
    """In a process forked from a rank: no wakeup pipe (its signals are not the rank's) and the default actions."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # forked from a thread that is not the main one: nothing to undo there
        pass


def _sigterm_from_parent_only() -> None:
    """Takes this process's SIGTERMs in a thread: one from the parent ends it (exit 0), any other is ignored."""
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def ignore_in_worker(worker_id: int) -> None:
    """The DataLoader's ``worker_init_fn``: the worker ignores SIGTERM and SIGUSR1 from anyone but its rank.

    NOTE: a launcher (DeepSpeed's, torchrun's process group, Slurm's step) signals the rank's DataLoader workers
    too; one that died of it would make the rank's DataLoader raise before the save. The rank itself still ends
    them: multiprocessing terminates (SIGTERM) and joins the workers left at the rank's exit, so ignoring SIGTERM
    outright would hang that exit. Hence SIGTERM is blocked and taken by a thread that exits on the parent's
    (what torch's own worker handler, replaced here, does for it). This runs after torch's worker start: a worker
    forked in :func:`signals_blocked` was born with both blocked, so a signal before it waits here, and both are
    blocked before any handler is reset.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    _reset_in_child()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # also drops one that came during the start
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    threading.Thread(target=_sigterm_from_parent_only, name="istack_ds-worker-sigterm", daemon=True).start()


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGTERM and SIGUSR1 blocked in the calling thread, for the start of DataLoader workers (a DataLoader
    iterator's creation): a worker is born with them blocked, so neither ends it before :func:`ignore_in_worker`.

    NOTE: only this thread blocks them: a signal to the rank meanwhile is taken by another of its threads (the
    reading thread of :func:`install` blocks none), whose C handler writes the wakeup pipe all the same; one that
    no thread could take is delivered when the mask is restored.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _die_with_parent() -> bool:
    """SIGTERM to this process when its parent dies (Linux; elsewhere the parent poll alone); True when set."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    return False


def install(grace_s: float, rank: int, world: int) -> None:
    """Arms the handlers of this process (once; from the main thread, after the process group started).

    `grace_s`: seconds from the first signal to the exit, at the latest.
    """
    global _watch
    if _watch is not None:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    for sig in SIGNALS:
        signal.signal(sig, lambda *_: None)  # the wakeup pipe carries it; the handler itself has nothing to do
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=_reset_in_child)
    ppid = os.getppid() if world > 1 else None  # before the prctl: a parent gone in between is still seen
    # a parent that died before the prctl sends no SIGTERM: the poll alone sees it
    pdeathsig = world > 1 and _die_with_parent() and os.getppid() == ppid
    _watch = _Watch(read, grace_s, rank, ppid, pdeathsig)
    _watch.start()


def requested() -> int:
    """The signal this process got (its number; 0 when none)."""
    return _watch.signum if _watch is not None else 0


def stop_if_requested(trainer) -> None:
    """At a step boundary, on every rank (a collective): when any rank got SIGTERM / SIGUSR1, every rank saves a
    checkpoint of this step, closes the run's writers and raises :class:`Preempted`."""
    import torch
    import torch.distributed as dist

    from .dist import control_group

    signals = [requested()]
    if dist.is_initialized() and dist.get_world_size() > 1:
        mine = torch.zeros(dist.get_world_size(), dtype=torch.int32)
        mine[dist.get_rank()] = signals[0]
        dist.all_reduce(mine, group=control_group())
        signals = mine.tolist()
    if not any(signals):
        return
    path: Path = trainer.save()
    if _watch is not None:  # a launcher's SIGTERM from now on ends a rank whose checkpoint is saved (exit 7)
        _watch.saved = True
    trainer.close()
    got = ", ".join(f"{signal.Signals(s).name} on rank {r}" for r, s in enumerate(signals) if s)
    raise Preempted(
        f"stopped by {got} at step {trainer.step}: checkpoint {path} saved; the same command with "
        f"checkpoint.resume=auto (a requeued job) continues from it (exit {PREEMPTED})"
    )
