"""One run per run directory: an exclusive lock file ``<run.out_dir>/.istack.lock`` held for the whole run.

Rank 0 takes it right after the process group starts, before the run writes anything into the directory
(`config.yaml`, checkpoints, TensorBoard), and every rank hears the outcome, so a refused run stops on every
rank together with one message naming the holder (exit 2). It is released when rank 0's process exits.

The lock file is created with ``O_CREAT | O_EXCL``: atomic on local file systems and on NFS v3+ and Lustre,
so of two runs started at once exactly one gets it. It holds the holder's host, pid, the start time of that
pid (so a pid reused by another process is not taken for the holder), Slurm job id and start time.

**Stale locks.** A holder on this host whose process is gone left a stale lock: it is taken over with a log
line. So is the lock of an earlier run of the same Slurm job (a requeue: the same SLURM_JOB_ID, a higher
SLURM_RESTART_COUNT), on any host: Slurm starts a requeued job only after its previous run ended (a node that
failed while its processes still run is the limit). Any other holder on another host cannot be judged from here
(its pid means nothing on this host): the run is refused, naming it; a user who knows that run is gone removes
the lock file. A shared file system without an atomic exclusive create (NFS v2, some FUSE mounts) can let two
runs both take the lock. NOTE: the takeover of a stale lock (remove, then create) is not atomic: two runs that
find the same stale lock within the same moment can both get in; a fresh lock is not affected.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".istack.lock"


class RunLockError(RuntimeError):
    """The run directory is held by another run; the message names the holder and the lock file."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ..., start time at index 19); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")".
    return stat.rsplit(")", 1)[-1].split()


def _pid_started(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None where unknown."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    """Process `pid` on this host runs, and is the one that took the lock (same start time where both known).

    A zombie (killed, not yet reaped by its parent, e.g. a launcher) is not alive: it writes nothing more.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: the signal said it exists
    return fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _pid_started(os.getpid()),
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, started {holder.get('started')}"


def read_holder(path: Path) -> dict | None:
    """The holder a lock file names; None when it cannot be read (a lock being written, or a broken file)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def acquire(out_dir: str | Path, log=print) -> Path:
    """Takes the lock of `out_dir` (created if missing) for this process; RunLockError naming the holder when
    another live run, or a run on another host, has it. A stale lock of this host is taken over."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    me = _me()
    for _ in range(2):  # a second try after a stale lock was removed
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            gone = _gone(holder, me)
            if gone:
                path.unlink(missing_ok=True)
                log(f"istack_ds: took over the stale lock {path}: its holder ({describe(holder or {})}) {gone}")
                continue
            raise RunLockError(_refusal(path, holder, me["host"])) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me, indent=1))
            f.flush()
            os.fsync(f.fileno())
        return path
    raise RunLockError(_refusal(path, read_holder(path), me["host"]))


def _gone(holder: dict | None, me: dict) -> str:
    """Why `holder`'s lock is stale ("" when it may not be): its process on this host is gone, or it is an
    earlier run of this very Slurm job (the same job id, a lower SLURM_RESTART_COUNT: Slurm starts a requeued
    job once its previous run has ended, on whatever nodes)."""
    if holder is None:
        return ""
    if me["job"] and holder.get("job") == me["job"] and me["restart"] > int(holder.get("restart") or 0):
        earlier = int(holder.get("restart") or 0)
        return f"was run {earlier} of Slurm job {me['job']}, requeued since (this is run {me['restart']})"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        if not _alive(holder["pid"], holder.get("pid_started")):
            return "is gone"
    return ""


def _refusal(path: Path, holder: dict | None, host: str) -> str:
    if holder is None:
        who = "a run whose lock file is unreadable"
    elif holder.get("host") == host:
        who = f"a running run ({describe(holder)})"
    else:
        who = f"a run on another host ({describe(holder)}; whether it still runs cannot be checked from {host})"
    return (
        f"{path.parent} is in use by {who}: two runs in one run directory would overwrite each other's "
        f"checkpoints and outputs. Choose another run.out_dir, or, if that run is gone, remove {path}"
    )


def release(path: Path) -> None:
    """Removes the lock `path` if this process holds it (never another run's lock)."""
    holder = read_holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


_held: Path | None = None
"""The lock this process took through :func:`lock_run` (released by :func:`release_held`)."""


def release_held() -> None:
    """Releases the lock :func:`lock_run` took in this process, if any (at exit; also before ``os._exit``)."""
    global _held
    if _held is not None:
        release(_held)
        _held = None


def lock_run(out_dir: str | Path) -> str:
    """Rank 0 takes the lock of `out_dir` until its process exits; "" on every rank when it did, else on every
    rank the message that names the holder (a collective where a process group runs)."""
    from .dist import broadcast_from_main, is_main, log0

    global _held
    refused = ""
    if is_main():
        try:
            path = acquire(out_dir, log=lambda message: log0("%s", message))
        except (RunLockError, OSError) as e:
            refused = str(e)
        else:
            _held = path
            atexit.register(release_held)
    return broadcast_from_main(refused)
