"""How a rank of a multi-rank run ends after a failure or a preemption: flushed, its run lock released, then
``os._exit``, skipping the interpreter's finalization.

NOTE: after a failed collective (a peer SIGKILLed) the process group's C++ objects are left with broken pairs and
pending work; destroying them in the interpreter's finalization can abort the process ("terminate called without
an active exception", SIGABRT, rc 134) after the exit code was chosen and the message printed. A process whose
message is out and whose files are written has nothing left to finalize, so it ends here instead
(tests/workers/protocol.py's write_all_ranks does the same for the test workers).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

CLEANUP_S = 5.0
"""Seconds the flush and the lock release may take before the process ends without them."""


def _clean_up() -> None:
    from .run_lock import release_held

    for flush in (sys.stdout.flush, sys.stderr.flush, logging.shutdown):
        try:
            flush()
        except Exception:  # noqa: BLE001 -- a closed stream must not keep the process from ending
            pass
    release_held()


def exit_now(code: int) -> None:
    """Flushes stdout, stderr and the log handlers, releases this process's run lock, and exits with `code`.

    NOTE: the exit does not wait on them beyond CLEANUP_S: they run in a thread of their own, as they can block
    (a hung file system under the run directory, the very case of the preemption's grace bound; a log handler's
    lock held by a main thread stuck on a full pipe).
    """
    cleanup = threading.Thread(target=_clean_up, name="istack_ds-exit-cleanup", daemon=True)
    cleanup.start()
    cleanup.join(CLEANUP_S)
    os._exit(code)
