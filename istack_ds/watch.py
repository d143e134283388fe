"""While a job runs: a silent rank named in the log before the collective timeout, and NCCL's own failure
reporting switched on.

Under NCCL a rank that dies or hangs ends the others' wait in NCCL's watchdog, which tears their processes down
(SIGABRT) at the timeout; the exit-4 message of :mod:`istack_ds.commands.train` may then never be printed. So the
rank is named before that: :func:`start_watch` reads the heartbeats (:mod:`istack_ds.dist`) every
:func:`watch_interval` seconds and logs each rank that went silent, and :func:`nccl_failure_env` makes NCCL's
watchdog and flight recorder record what each rank was doing (a dump per rank at the timeout).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

log = logging.getLogger("istack_ds")

#: NCCL's failure reporting, set unless the user set it: the process is torn down at a failed or timed-out
#: collective without cleaning up its communicators (torch's default, written out: an abort of a hung
#: communicator can hang itself), and the flight recorder keeps the last 2000 collectives of each rank and
#: dumps them at a timeout (to $TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>, torch's default /tmp/nccl_trace_rank_).
NCCL_FAILURE_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}


def nccl_failure_env(backend: str) -> dict[str, str]:
    """Sets :data:`NCCL_FAILURE_ENV` for `backend` nccl (each variable the user set is kept); returns what it
    set. Before the process group: NCCL reads them when it starts."""
    if backend != "nccl":
        return {}
    added = {k: v for k, v in NCCL_FAILURE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    return added


def watch_interval(timeout_s: float | None) -> float:
    """Seconds between two looks at the heartbeats: a quarter of the collective timeout, at most 30 s, at least
    three heartbeats (a shorter look would call a live rank silent)."""
    from .dist import HEARTBEAT_S

    longest = 30.0 if timeout_s is None else min(30.0, timeout_s / 4)
    return max(3 * HEARTBEAT_S, longest)


class SilentRankWatch(threading.Thread):
    """A daemon thread: every `interval` seconds, the ranks of `ranks` whose heartbeat did not change are logged
    (once each until they beat again), and a store that stops answering once.

    Rank 0 watches every other rank; the others watch rank 0 only, whose host keeps the store (one key each).
    """

    def __init__(self, connect, ranks: list[int], interval: float, timeout_s: float | None):
        super().__init__(name="istack_ds-watch", daemon=True)
        self.connect, self.ranks, self.interval, self.timeout_s = connect, ranks, interval, timeout_s
        self.silent: set[int] = set()
        self.store_lost = False
        self.stopped = threading.Event()

    def run(self) -> None:
        store = None
        while not self.stopped.is_set():
            try:
                store = store or self.connect()
                self.look(store)
            except Exception as e:  # noqa: BLE001 -- any failure to reach the store means the same here
                store = None
                if self.stopped.is_set():  # at exit: rank 0 and its store may be gone already
                    return
                if not self.store_lost:
                    log.warning(
                        "the job's store does not answer (%s): rank 0 or its host died or hangs; collectives fail "
                        "after deepspeed.dist_timeout_s=%s",
                        type(e).__name__,
                        self.timeout_s,
                    )
                self.store_lost = True
                self.stopped.wait(self.interval)

    def look(self, store) -> None:
        """One look: waits `interval` seconds between two reads of the heartbeats and logs what changed."""
        from .dist import silent_ranks

        silent = silent_ranks(store, self.ranks, self.interval, wait=self.stopped.wait)
        if self.stopped.is_set():
            return
        for r in sorted(set(silent) - self.silent):
            log.warning(
                "rank %d: no heartbeat for %.0f s or more (dead, stopped or its host frozen); collectives with it "
                "fail after deepspeed.dist_timeout_s=%s",
                r,
                self.interval,
                self.timeout_s,
            )
        for r in sorted(self.silent - set(silent)):
            log.warning("rank %d beats again", r)
        self.silent = set(silent)

    def stop(self) -> None:
        """Ends the watch and waits for the thread (at exit: a store call cut off by the interpreter's shutdown
        aborts the process, as :meth:`istack_ds.dist.Heartbeat.stop` says)."""
        self.stopped.set()
        self.join(timeout=10)


def start_watch(timeout_s: float | None) -> SilentRankWatch | None:
    """Starts the :class:`SilentRankWatch` of this rank when it keeps a heartbeat (more than one rank, the job's
    store known); None otherwise."""
    from . import dist

    address = dist._store_address()
    if dist._heartbeat is None or address is None:
        return None
    me, world = dist.rank(), dist.world_size()
    others = [r for r in range(world) if r != me] if me == 0 else [0]
    watch = SilentRankWatch(lambda: dist._store_client(address), others, watch_interval(timeout_s), timeout_s)
    watch.start()
    atexit.register(watch.stop)
    return watch
